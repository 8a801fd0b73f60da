"""Deterministic WebDataset tars and their DALI index files.

Tar members get fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644, ustar headers) so the
same samples always give the same bytes. The index is the text format of DALI's ``wds2idx``
(``v1.2 <samples>`` then one line per sample: ``ext offset size name`` for each of its members, where
offset is where the member's data starts), written while the tar is written so no re-scan is needed.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

BLOCK = tarfile.BLOCKSIZE  # 512
INDEX_VERSION = "v1.2"


def padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def sample_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes a sample takes in a ustar tar: a 512-byte header plus padded data per member."""
    return sum(BLOCK + padded(len(data)) for _, data in members)


def tar_file_size(member_bytes: int) -> int:
    """Size of a finished tar whose members take ``member_bytes``: two zero blocks, padded to 10 KiB records."""
    end = member_bytes + 2 * BLOCK
    return (end + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


def split_name(name: str) -> tuple[str, str]:
    """``'a/b.c.d'`` -> ``('a/b', 'c.d')``: WebDataset's (and wds2idx's) key/extension split."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


@dataclass
class ShardWriter:
    """Writes samples ``(key, [(ext, bytes), ...])`` to an open binary file as a tar, recording the index."""

    fileobj: io.BufferedIOBase
    index_lines: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._tar = tarfile.open(fileobj=self.fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        parts = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            data_offset = self._tar.offset - padded(len(data))
            parts.append(f"{ext} {data_offset} {len(data)} {info.name}")
        self.index_lines.append(" ".join(parts))

    def close(self) -> str:
        """Finish the tar (end blocks, record padding); return the index file's text."""
        self._tar.close()
        return f"{INDEX_VERSION} {len(self.index_lines)}\n" + "".join(line + "\n" for line in self.index_lines)


def index_of_tar(path) -> str:
    """Re-derive a tar's wds2idx index text by reading it (used by ``verify``)."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/"):
                continue
            part = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([part])
                last_key = key
            else:
                samples[-1].append(part)
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)
