"""The tar format as both sides of the snapshotter use it: the reader of Gentoo's snapshots
(sync/tarstream.py) and the writer of published ones (publish/snapshots.py).

An archive is a sequence of 512-byte blocks: per member a header block, then its data padded to whole
blocks; two zero blocks end it, and writers pad the whole to a multiple of a record. The header fields
below are those of POSIX ustar; GNU and pax headers use the same offsets.
"""

from __future__ import annotations

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default blocking factor

# Header fields, as slices of a header block (TYPEFLAG is a single byte: an index).
NAME = slice(0, 100)
MODE = slice(100, 108)
UID = slice(108, 116)
GID = slice(116, 124)
SIZE = slice(124, 136)
MTIME = slice(136, 148)
CHKSUM = slice(148, 156)
TYPEFLAG = 156
LINKNAME = slice(157, 257)
MAGIC = slice(257, 263)
VERSION = slice(263, 265)
UNAME = slice(265, 297)
GNAME = slice(297, 329)
DEVMAJOR = slice(329, 337)
DEVMINOR = slice(337, 345)
PREFIX = slice(345, 500)  # ustar: the directory part of a long name, joined to NAME with a slash

NAME_LEN = NAME.stop - NAME.start
LINKNAME_LEN = LINKNAME.stop - LINKNAME.start
PREFIX_LEN = PREFIX.stop - PREFIX.start

USTAR_MAGIC = b"ustar\0"  # with VERSION b"00" (GNU tar writes b"ustar  \0" across both fields instead)
USTAR_VERSION = b"00"

MAX_OCTAL_11 = 8**11 - 1  # the largest size or mtime the 12-byte octal fields hold (beyond: pax or base-256)

# Type flags (the byte at TYPEFLAG).
REGTYPE = b"0"
AREGTYPE = b"\0"  # a regular file, as pre-POSIX tars wrote it
LNKTYPE = b"1"  # hard link
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"  # contiguous file: a regular file
GNUTYPE_LONGNAME = b"L"  # GNU: the data is the next member's name
GNUTYPE_LONGLINK = b"K"  # GNU: the data is the next member's link target
XHDTYPE = b"x"  # pax extended header for the next member
XGLTYPE = b"g"  # pax global header


def checksum(header: bytes) -> int:
    """The header checksum: the sum of the block's bytes, the checksum field itself counted as spaces."""
    return sum(header[:CHKSUM.start]) + 0x20 * (CHKSUM.stop - CHKSUM.start) + sum(header[CHKSUM.stop:BLOCK])
