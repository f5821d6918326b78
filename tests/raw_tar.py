"""Writing tar files member by member for tests: exactly the bytes given, no validation, optionally cut short.

``ShardWriter`` refuses bad records and writes only good samples; the tests that need bad or odd shards (broken
JSON, undecodable images, duplicate members, a file that ends inside a member) build them with ``write_tar``.
"""

import io
import tarfile


def write_tar(path, members, cut_inside=None, fmt=tarfile.PAX_FORMAT) -> str:
    """A tar of ``(name, bytes)`` members in order (mtime 0); with ``cut_inside``, the file ends 10 bytes into that
    member's data (a truncated shard). Returns the path as a string."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    if cut_inside:
        with tarfile.open(path) as tar:
            cut = tar.getmember(cut_inside).offset_data + 10
        with open(path, "r+b") as f:
            f.truncate(cut)
    return str(path)
