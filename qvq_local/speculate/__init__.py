"""Speculative decoding: guess several tokens, check them in one forward pass, keep the right ones.

Mechanism, used by the backend sessions (``backends/``) so the reasoning controller is unchanged:
``ngram`` (the default drafter), ``engine`` (the speculator a session drives: draft, verify, roll back),
``policy`` (how many guesses pay, and when speculation is off), ``costs`` (the verify cost curve,
measured once per model and machine), ``replay`` (real reasoning text replayed through it).
"""
