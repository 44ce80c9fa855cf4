"""Late folders: local disk whose view of other machines' writes lags (Google Drive mounted
in Colab, rclone, gcsfuse). Writes are local disk's; what differs is that an exclusive
create can succeed on two machines, so leases there claim, then confirm after a settle
delay (see :mod:`sweeprun.leases`)."""

from __future__ import annotations

import functools
import os

import fsspec

from .local import LocalBackend, mount_fstype

#: The settle delay on folders known to show one machine's writes to another late: Google
#: Drive mounted in Colab shows another VM's new file within seconds, and sometimes a
#: minute later. A take there waits this long (twice, when machines contend).
SETTLE_DEFAULT_S = 60.0

#: Mounts whose view of other machines' writes is cached and late (FUSE types by name part).
_LATE_MOUNTS = ("drive", "rclone", "gcsfuse", "onedrive", "dropbox")
_DRIVE_PARTS = ("MyDrive", "My Drive", "Shareddrives", "Shared drives")


class LateFolderBackend(LocalBackend):
    """Local disk that other machines see late: claims settle for :attr:`settle_s`."""

    kind = "late"

    def __init__(self, fs: fsspec.AbstractFileSystem, why: str) -> None:
        super().__init__(fs)
        self.settle_s = SETTLE_DEFAULT_S
        self.settle_why = why


@functools.lru_cache(maxsize=256)
def late_reason(root: str) -> str | None:
    """Why the local folder ``root`` shows other machines' writes late, or ``None`` where it
    does not (a local disk, NFS). Read from its path and /proc/mounts, once per folder."""
    path = os.path.realpath(root)
    parts = path.split(os.sep)
    if path.startswith("/content/drive/") or any(p in _DRIVE_PARTS or p.startswith("GoogleDrive")
                                                 for p in parts):
        return f"{path} looks like a Google Drive folder"
    fstype = mount_fstype(path) or ""
    if fstype.startswith("fuse.") and any(name in fstype for name in _LATE_MOUNTS):
        return f"{path} is on a {fstype} mount"
    return None
