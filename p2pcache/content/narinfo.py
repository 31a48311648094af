"""The `.narinfo` text format of Nix binary caches: parse, validate, render, sign and verify.

Owns the `Key: value` lines Nix writes (StorePath, URL, Compression, FileHash, FileSize, NarHash, NarSize,
References, Deriver, System, Sig (repeated), CA) as a frozen `NarInfo`. Fields we do not know are kept, in their
order, in `NarInfo.extra` and rendered back after the known ones: a narinfo passing through us never loses a line.
Rendering writes the known fields in the order Nix writes them, so a Nix-written narinfo renders back to the
same text; other inputs render to equivalent text (hashes printed as `sha256:<nix32>`).

Parsing is as strict as Nix's and a little stricter: every line is `Key: value\\n`; StorePath, URL, NarHash and
a non-zero NarSize are required; single-valued fields may not repeat; hashes, sizes, store paths, CA and
signatures must be well-formed. Errors are one line naming the field and line number. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..errors import InvalidInput
from .nixhash import InvalidNixHash, NixHash
from .nixhash import parse as parse_hash
from .nixsig import InvalidSignature, PublicKey, SecretKey, Signature, fingerprint, verify_any
from .storepath import InvalidStorePath, StorePath

__all__ = ["InvalidNarInfo", "NarInfo", "check_ca"]

MAX_NARINFO = 1 << 20  # a narinfo with thousands of references is still far below this
UNKNOWN_DERIVER = "unknown-deriver"

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_SIZE = re.compile(r"[0-9]{1,20}\Z")


class InvalidNarInfo(InvalidInput):
    pass


def check_ca(ca: str) -> None:
    """Raise InvalidNarInfo unless `ca` is a content address Nix renders: `text:<hash>` or
    `fixed:[r:|git:]<hash>`, the hash being `<algo>:<body>`."""
    for prefix in ("text:", "fixed:r:", "fixed:git:", "fixed:"):
        if ca.startswith(prefix):
            try:
                parse_hash(ca[len(prefix) :])
            except InvalidNixHash as e:
                raise InvalidNarInfo(f"CA {ca!r} has a bad hash: {e}") from None
            if prefix == "text:" and not ca.startswith("text:sha256:"):
                raise InvalidNarInfo(f"CA {ca!r}: text content addresses use sha256")
            return
    raise InvalidNarInfo(f"CA {ca[:200]!r} is not 'text:<hash>' or 'fixed:[r:|git:]<hash>'")


def _check_value(key: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise InvalidNarInfo(f"narinfo field {key} holds a line break")


@dataclass(frozen=True, slots=True)
class NarInfo:
    """One narinfo. References and Deriver are base names (`<hash>-<name>`), as in the file."""

    store_path: StorePath
    url: str
    nar_hash: NixHash
    nar_size: int
    compression: str | None = None  # absent means bzip2 to Nix; kept absent so rendering is faithful
    file_hash: NixHash | None = None
    file_size: int | None = None
    references: tuple[str, ...] = ()
    deriver: str | None = None  # a base name or "unknown-deriver"
    system: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.store_path, StorePath):
            raise InvalidNarInfo(f"narinfo store_path must be a StorePath, got {type(self.store_path).__name__}")
        if not self.url:
            raise InvalidNarInfo(f"narinfo for {self.store_path} has an empty URL")
        for size_field in ("nar_size", "file_size"):
            v = getattr(self, size_field)
            if v is None and size_field == "file_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
                raise InvalidNarInfo(f"narinfo for {self.store_path}: {size_field} {v!r} is not a 64-bit count")
        if self.nar_size == 0:
            raise InvalidNarInfo(f"narinfo for {self.store_path}: NarSize is zero")
        for name, value in (("URL", self.url), ("Compression", self.compression), ("System", self.system)):
            if value is not None:
                _check_value(name, value)
                if value != value.strip() or (name == "Compression" and not value):
                    raise InvalidNarInfo(f"narinfo for {self.store_path}: {name} {value!r} is malformed")
        store_dir = self.store_path.store_dir
        try:
            for ref in self.references:
                StorePath.from_base_name(ref, store_dir)
            if self.deriver is not None and self.deriver != UNKNOWN_DERIVER:
                StorePath.from_base_name(self.deriver, store_dir)
        except InvalidStorePath as e:
            raise InvalidNarInfo(f"narinfo for {self.store_path}: {e}") from None
        try:
            for sig in self.sigs:
                Signature.parse(sig)
        except InvalidSignature as e:
            raise InvalidNarInfo(f"narinfo for {self.store_path}: {e}") from None
        if self.ca is not None:
            check_ca(self.ca)
        for key, value in self.extra:
            if not _KEY.match(key) or key in _FIELDS:
                raise InvalidNarInfo(f"narinfo extra field name {key[:80]!r} is malformed or a known field")
            _check_value(key, value)

    # -- text form ---------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes, store_dir: str | None = None, source: str = "narinfo") -> NarInfo:
        """Parse narinfo text. With `store_dir`, StorePath must be in it; `source` names the input in errors."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            if len(text) > MAX_NARINFO:
                raise InvalidNarInfo(f"{source} is larger than {MAX_NARINFO} bytes")
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidNarInfo(f"{source} is not UTF-8 text (byte {e.start})") from None
        if len(text) > MAX_NARINFO:
            raise InvalidNarInfo(f"{source} is larger than {MAX_NARINFO} characters")
        if not text:
            raise InvalidNarInfo(f"{source} is empty")
        if not text.endswith("\n"):
            raise InvalidNarInfo(f"{source} does not end with a newline (truncated?)")

        single: dict[str, str] = {}
        sigs: list[str] = []
        extra: list[tuple[str, str]] = []
        lines = text[:-1].split("\n")
        for number, line in enumerate(lines, 1):
            key, sep, value = line.partition(": ")
            if not sep:
                if line.endswith(":") and _KEY.match(line[:-1]):
                    raise InvalidNarInfo(f"{source} line {number}: field {line[:-1]} needs ': ' before its (empty) value")
                raise InvalidNarInfo(f"{source} line {number}: expected 'Key: value', got {line[:80]!r}")
            if not _KEY.match(key):
                raise InvalidNarInfo(f"{source} line {number}: malformed field name {key[:80]!r}")
            if "\r" in value:
                raise InvalidNarInfo(f"{source} line {number}: field {key} holds a carriage return")
            if key == "Sig":
                sigs.append(value)
            elif key in _FIELDS:
                if key in single:
                    raise InvalidNarInfo(f"{source} line {number}: field {key} appears twice")
                single[key] = value
            else:
                extra.append((key, value))

        def required(key: str) -> str:
            if key not in single:
                raise InvalidNarInfo(f"{source} has no {key} field")
            return single[key]

        def size(key: str) -> int:
            value = single[key]
            if not _SIZE.match(value) or int(value) >= 1 << 64:
                raise InvalidNarInfo(f"{source}: {key} {value[:80]!r} is not a decimal 64-bit count")
            return int(value)

        def hash_field(key: str) -> NixHash:
            try:
                return parse_hash(single[key])
            except InvalidNixHash as e:
                raise InvalidNarInfo(f"{source}: bad {key}: {e}") from None

        try:
            store_path = StorePath.parse(required("StorePath"), store_dir)
        except InvalidStorePath as e:
            raise InvalidNarInfo(f"{source}: bad StorePath: {e}") from None
        required("URL")
        required("NarHash")
        if "NarSize" not in single:
            raise InvalidNarInfo(f"{source} has no NarSize field")
        refs = single.get("References")
        try:
            return cls(
                store_path=store_path,
                url=single["URL"],
                nar_hash=hash_field("NarHash"),
                nar_size=size("NarSize"),
                compression=single.get("Compression"),
                file_hash=hash_field("FileHash") if "FileHash" in single else None,
                file_size=size("FileSize") if "FileSize" in single else None,
                references=tuple(refs.split(" ")) if refs else (),
                deriver=single.get("Deriver"),
                system=single.get("System"),
                sigs=tuple(sigs),
                ca=single.get("CA"),
                extra=tuple(extra),
            )
        except InvalidNarInfo as e:
            raise InvalidNarInfo(f"{source}: {e}") from None

    def render(self) -> str:
        """The narinfo text, fields in Nix's order, unknown fields last in their original order."""
        out = [f"StorePath: {self.store_path}\n", f"URL: {self.url}\n"]
        if self.compression is not None:
            out.append(f"Compression: {self.compression}\n")
        if self.file_hash is not None:
            out.append(f"FileHash: {self.file_hash.nix32()}\n")
        if self.file_size is not None:
            out.append(f"FileSize: {self.file_size}\n")
        out.append(f"NarHash: {self.nar_hash.nix32()}\n")
        out.append(f"NarSize: {self.nar_size}\n")
        out.append(f"References: {' '.join(self.references)}\n")
        if self.deriver is not None:
            out.append(f"Deriver: {self.deriver}\n")
        if self.system is not None:
            out.append(f"System: {self.system}\n")
        out.extend(f"Sig: {sig}\n" for sig in self.sigs)
        if self.ca is not None:
            out.append(f"CA: {self.ca}\n")
        out.extend(f"{key}: {value}\n" for key, value in self.extra)
        return "".join(out)

    __str__ = render

    # -- derived views -----------------------------------------------------------------------------------

    @property
    def effective_compression(self) -> str:
        """The compression Nix assumes: an absent Compression field means bzip2."""
        return self.compression or "bzip2"

    @property
    def reference_paths(self) -> tuple[StorePath, ...]:
        return tuple(StorePath.from_base_name(r, self.store_path.store_dir) for r in self.references)

    @property
    def deriver_path(self) -> StorePath | None:
        if self.deriver is None or self.deriver == UNKNOWN_DERIVER:
            return None
        return StorePath.from_base_name(self.deriver, self.store_path.store_dir)

    def fingerprint(self) -> str:
        """What a `Sig:` signs (Nix's ValidPathInfo::fingerprint)."""
        refs = (f"{self.store_path.store_dir}/{r}" for r in self.references)
        return fingerprint(str(self.store_path), self.nar_hash, self.nar_size, refs)

    def signatures(self) -> tuple[Signature, ...]:
        return tuple(Signature.parse(s) for s in self.sigs)

    def signed(self, key: SecretKey) -> NarInfo:
        """A copy with `key`'s signature added (replacing an earlier signature by a key of the same name)."""
        sig = str(key.sign(self.fingerprint()))
        kept = tuple(s for s in self.sigs if Signature.parse(s).key_name != key.name)
        return replace(self, sigs=(*kept, sig))

    def verify(self, keys: Iterable[PublicKey]) -> bool:
        """True iff one of the signatures is valid under a key of the same name (Nix's rule for
        `require-sigs`; content-addressed paths are not exempted here)."""
        return verify_any(self.fingerprint(), self.signatures(), keys)


_FIELDS = frozenset(
    ["StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References", "Deriver",
     "System", "CA", "Sig"]
)
