"""Nix store paths: `<store dir>/<32 nix-base32 chars>-<name>`.

Owns parsing and validating store paths and their base names (`<hash>-<name>`), with the rules of Nix's
`StorePath`: the hash part is 32 characters of Nix's base32 alphabet (160 bits, so no padding bits), the name
is 1..211 characters from `[A-Za-z0-9+\\-._?=]`, and the name may not be `.` or `..` or start with `.-` / `..-`
(the rule of current Nix; it is looser than Nix 2.8, which refused every leading `.`, so we accept what any
Nix writes). The store directory defaults to `/nix/store`; any other absolute, canonical directory is allowed.
Pure: never touches the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput
from . import nixbase32

__all__ = [
    "DEFAULT_STORE_DIR",
    "HASH_PART_LEN",
    "MAX_NAME_LEN",
    "InvalidStorePath",
    "StorePath",
    "check_name",
    "check_store_dir",
]

DEFAULT_STORE_DIR = "/nix/store"
HASH_PART_LEN = 32  # nix-base32 of a 160-bit truncated sha256
HASH_PART_BYTES = 20
MAX_NAME_LEN = 211  # Nix's StorePath::MaxPathLen

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
_HASH_CHARS = frozenset(nixbase32.ALPHABET)


class InvalidStorePath(InvalidInput):
    pass


def _show(text: str) -> str:
    return repr(text if len(text) <= 300 else text[:300] + "...")


def check_name(name: str, *, context: str = "") -> None:
    """Raise InvalidStorePath unless `name` is a valid store path name."""
    where = f" in store path {_show(context)}" if context else ""
    if not name:
        raise InvalidStorePath(f"store path name is empty{where}")
    if len(name) > MAX_NAME_LEN:
        raise InvalidStorePath(f"store path name {_show(name)}{where} is longer than {MAX_NAME_LEN} characters")
    if name in (".", "..") or name.startswith((".-", "..-")):
        raise InvalidStorePath(f"store path name {_show(name)}{where} is not valid ('.' and '..' are reserved)")
    if not _NAME_CHARS.issuperset(name):
        bad = next(c for c in name if c not in _NAME_CHARS)
        raise InvalidStorePath(
            f"store path name {_show(name)}{where} contains illegal character {bad!r}; "
            "allowed are letters, digits and +-._?="
        )


def check_store_dir(store_dir: str) -> None:
    """A store directory is absolute and canonical: no trailing slash, no empty, `.` or `..` components."""
    if not store_dir.startswith("/") or store_dir == "/":
        raise InvalidStorePath(f"store directory {_show(store_dir)} must be an absolute path other than '/'")
    parts = store_dir[1:].split("/")
    if any(p in ("", ".", "..") for p in parts) or "\0" in store_dir or "\n" in store_dir:
        raise InvalidStorePath(f"store directory {_show(store_dir)} is not a canonical absolute path")


@dataclass(frozen=True, slots=True, order=True)
class StorePath:
    """A validated store path. Orders like Nix's path sets (by store dir, then base name)."""

    store_dir: str
    hash_part: str
    name: str

    def __post_init__(self) -> None:
        check_store_dir(self.store_dir)
        if len(self.hash_part) != HASH_PART_LEN or not _HASH_CHARS.issuperset(self.hash_part):
            raise InvalidStorePath(
                f"store path hash part {_show(self.hash_part)} is not {HASH_PART_LEN} nix-base32 characters"
            )
        check_name(self.name, context=f"{self.hash_part}-{self.name}")

    @classmethod
    def parse(cls, path: str, store_dir: str | None = None) -> StorePath:
        """Parse a full store path. With `store_dir` given, the path must be directly inside it; without, the
        store directory is whatever precedes the last `/`."""
        if not isinstance(path, str):
            raise InvalidStorePath(f"store path must be a string, got {type(path).__name__}")
        slash = path.rfind("/")
        if slash <= 0:
            raise InvalidStorePath(f"{_show(path)} is not a store path: expected '<store dir>/<hash>-<name>'")
        parent = path[:slash]
        if store_dir is not None and parent != store_dir:
            raise InvalidStorePath(f"path {_show(path)} is not in the Nix store {store_dir!r}")
        return cls.from_base_name(path[slash + 1 :], parent)

    @classmethod
    def from_base_name(cls, base_name: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
        """Parse `<hash>-<name>` (what narinfo References and Deriver fields hold)."""
        if not isinstance(base_name, str):
            raise InvalidStorePath(f"store path base name must be a string, got {type(base_name).__name__}")
        if len(base_name) < HASH_PART_LEN + 2 or base_name[HASH_PART_LEN] != "-":
            raise InvalidStorePath(
                f"{_show(base_name)} is not a store path base name: expected 32 nix-base32 characters, '-', a name"
            )
        return cls(store_dir, base_name[:HASH_PART_LEN], base_name[HASH_PART_LEN + 1 :])

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def digest(self) -> bytes:
        """The 20 bytes the hash part encodes."""
        return nixbase32.decode(self.hash_part, HASH_PART_BYTES)

    @property
    def is_derivation(self) -> bool:
        return self.name.endswith(".drv")

    def __str__(self) -> str:
        return f"{self.store_dir}/{self.hash_part}-{self.name}"
