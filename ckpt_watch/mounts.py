"""Which filesystem a path lives on, read from /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# Where inotify sees only this machine's writes: other hosts' saves go unseen.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "beegfs",
        "glusterfs",
        "9p",
        "afs",
        "ocfs2",
        "gfs2",
        "panfs",
        "wekafs",
    }
)


def filesystem_type(path: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the filesystem holding ``path`` (longest mount point), or None if unknown."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        mount_point, fstype = _parse(line)
        if mount_point is None or fstype is None:
            continue
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fstype)
    return best[1] if best else None


def mounts_below(path: Path, mountinfo: Path = MOUNTINFO) -> list[str]:
    """Mount points strictly inside ``path`` (bind mounts of the same filesystem included)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    prefix = os.path.realpath(path).rstrip("/") + "/"
    points = (_parse(line)[0] for line in lines)
    return sorted(point for point in points if point and point.startswith(prefix))


def is_network_filesystem(fstype: str | None) -> bool:
    """Network and FUSE filesystems, where inotify cannot be trusted."""
    if fstype is None:
        return False
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse")


def _parse(line: str) -> tuple[str | None, str | None]:
    # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
    fields = line.split()
    try:
        separator = fields.index("-")
    except ValueError:
        return None, None
    if len(fields) < 5 or separator + 1 >= len(fields):
        return None, None
    return _unescape(fields[4]), fields[separator + 1]


def _unescape(text: str) -> str:
    """Mount points escape space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text
