"""Byte counts: decimal for files and downloads, binary for memory, each unit named."""

from qvq_local.units import file_size, memory_size


def test_file_sizes_are_decimal():
    assert file_size(999) == "999 B"
    assert file_size(1000) == "1.0 KB"
    assert file_size(4_200_000) == "4.2 MB"
    assert file_size(47_400_000_000) == "47.4 GB"
    assert file_size(3 * 10**15) == "3000.0 TB"
    assert file_size(None) == "?"


def test_memory_sizes_are_binary():
    assert memory_size(1023) == "1023 B"
    assert memory_size(1024) == "1.0 KiB"
    assert memory_size(512 * 2**20) == "512.0 MiB"
    assert memory_size(int(23.4 * 2**30)) == "23.4 GiB"
    assert memory_size(None) == "?"
