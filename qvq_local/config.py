"""User settings: the default model and the defaults of ``qvq ask``, kept in ``QVQ_HOME/config.json``.

Why a file and environment variables both: the file is what ``qvq config set`` writes once, and the
environment (``QVQ_MODEL``, ``QVQ_BACKEND``) overrides it for one shell or one CI job without touching it.
Only known keys are accepted, each with its type checked on ``set``, so a typo cannot sit silently in the
file.  The file is written atomically (temporary name, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvq_local import atomic, strict_json
from qvq_local.errors import InputError

CONFIG_NAME = "config.json"


def qvq_home() -> Path:
    """Where qvq-local keeps models and settings: ``$QVQ_HOME``, else ``~/.cache/qvq``."""
    env = os.environ.get("QVQ_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qvq"


def config_path() -> Path:
    return qvq_home() / CONFIG_NAME


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise InputError(f"expected a number above 0, got {number}")
    return number


def _backend(value: str) -> str:
    """A backend name or alias, stored as its canonical name (``llamacpp`` -> ``llama``)."""
    from qvq_local.backends import registry

    if not value.strip():
        raise InputError("expected a backend name")
    return registry.canonical(value)


def _text(value: str) -> str:
    if not value.strip():
        raise InputError("expected a non-empty value")
    point = strict_json.lone_surrogate(value)
    if point is not None:  # the rule for all text (settings.check_text): not text, refused by name
        raise InputError(f"expected text, got a lone UTF-16 surrogate ({point}; bytes that are not UTF-8?)")
    return value.strip()


def _backend_choices() -> str:
    from qvq_local.backends import registry

    return registry.choices()


def _server_kind(value: str) -> str:
    from qvq_local.backends.options import check_kind

    return check_kind(value)


def _detail(value: str) -> str:
    """An image detail level (``qvq_local.detail``), ``auto`` for this machine's default."""
    from qvq_local.detail import check_level

    return check_level(value, "the detail level")


def _server_kinds() -> str:
    from qvq_local.backends.options import SERVER_KINDS

    return " | ".join(SERVER_KINDS)


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    help: str
    env: str | None = None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("model", _text, "default model for qvq ask (name, folder, GGUF file or hub id)", "QVQ_MODEL"),
        Setting("backend", _backend, "default backend: " + _backend_choices(), "QVQ_BACKEND"),
        Setting("think_budget", _positive_int, "default thinking budget in tokens"),
        Setting("answer_budget", _positive_int, "default answer budget in tokens"),
        Setting("max_pixels", _positive_int, "default pixel bound per image (wins over detail)"),
        Setting(
            "detail",
            _detail,
            "default image detail: low | medium | high | max | auto (auto: chosen from this machine)",
        ),
        Setting(
            "cache_max_mb", _positive_int, "size cap of the prefix cache on disk, in MB", "QVQ_CACHE_MAX_MB"
        ),
        Setting(
            "base_url",
            _text,
            "server address for --backend openai (e.g. http://127.0.0.1:8000/v1)",
            "QVQ_BASE_URL",
        ),
        Setting("server_kind", _server_kind, "server kind for --backend openai: " + _server_kinds()),
    )
}


def _check_key(key: str) -> Setting:
    norm = key.strip().lower().replace("-", "_")
    if norm not in SETTINGS:
        raise InputError(f"unknown setting {key!r}: known settings are {', '.join(SETTINGS)}")
    return SETTINGS[norm]


def read_file() -> dict[str, Any]:
    """The settings stored in the config file (no environment applied); {} when there is none."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError(f"cannot read the settings: {exc.strerror or exc}", path=path) from exc
    try:
        # strict: NaN, Infinity and numbers beyond a double's range are not JSON (surrogates may stand
        # for a path's undecodable bytes, so they are kept)
        data = strict_json.loads(text, surrogates=True) if text.strip() else {}
    except strict_json.JsonError as exc:
        raise InputError(str(exc), path=path, hint="fix or delete the file") from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path=path, hint="fix or delete the file")
    return data


def _write_file(data: dict[str, Any]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def get(key: str) -> Any:
    """A setting's effective value (environment first, then the file); None when unset.  A value from the
    file is checked as ``set`` checks it: the file may have been edited by hand."""
    setting = _check_key(key)
    if setting.env and os.environ.get(setting.env):
        return setting.parse(os.environ[setting.env])
    value = read_file().get(setting.name)
    if value is None:
        return None
    try:
        return setting.parse(value if isinstance(value, str) else json.dumps(value))
    except InputError as err:
        raise InputError(
            f"the {setting.name} setting: {err}",
            path=config_path(),
            hint=f"qvq config set {setting.name} VALUE, or fix the file",
        ) from None


def source(key: str) -> str:
    """Where a setting's effective value comes from: the environment variable, the file, or "unset"."""
    setting = _check_key(key)
    if setting.env and os.environ.get(setting.env):
        return f"${setting.env}"
    return str(config_path()) if setting.name in read_file() else "unset"


def set_value(key: str, value: str) -> Any:
    """Check and store a setting; return the parsed value."""
    setting = _check_key(key)
    parsed = setting.parse(value)
    data = read_file()
    data[setting.name] = parsed
    _write_file(data)
    return parsed


def unset(key: str) -> bool:
    """Remove a setting from the file; True when it was there."""
    setting = _check_key(key)
    data = read_file()
    if setting.name not in data:
        return False
    del data[setting.name]
    _write_file(data)
    return True


def effective() -> dict[str, Any]:
    """Every known setting's effective value (None when unset)."""
    stored = read_file()
    out: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        if setting.env and os.environ.get(setting.env):
            out[name] = setting.parse(os.environ[setting.env])
        else:
            out[name] = stored.get(name)
    return out


def default_model() -> str | None:
    """The model ``qvq ask`` uses when ``--model`` is not given: ``$QVQ_MODEL``, else the config file."""
    value = get("model")
    return str(value) if value else None
