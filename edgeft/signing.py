"""Ed25519 keys and signatures over an artifact's manifest digest.

A digest (``edgeft.artifact.manifest_digest``) catches corruption, not an attacker, who
can recompute it after changing a file. A signature made with a private key the
attacker does not hold closes that gap: ``sign_digest`` signs the digest, and
``check_signature`` accepts an artifact only when one of the trusted public keys made
its signature. Keys are standard PEM files: PKCS#8 for the private key (written with
mode 0600), SubjectPublicKeyInfo for the public key, both readable by ``openssl``.

The signature is a small record inside ``manifest.json`` (its ``signature`` field),
kept out of the digest it signs. This module knows keys and bytes, nothing of the
artifact's layout; it imports the ``cryptography`` package (the ``sign`` extra, also in
``runtime``) only inside its functions, so importing edgeft never needs it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.flags import flag
from edgeft.fsutil import atomic_write_files, os_errors_as_one_line

ALGORITHM = "ed25519"
FIELDS = ("algorithm", "key_id", "value")  # a signature record holds these and nothing else
_CONTEXT = b"edgeft-artifact-signature-v1\n"  # what is signed: this prefix + the digest string


@dataclass(frozen=True, kw_only=True)
class TrustedKeys:
    """The one declaration of ``--trusted-key``, for the configs of the commands that check signatures."""

    trusted_keys: tuple[Path, ...] = field(default=(), metadata=flag("--trusted-key", env="EDGEFT_TRUSTED_KEY"))
    """Public key (PEM, from edgeft keygen): accept only artifacts signed by it. Repeat for several (key
    rotation). Env: EDGEFT_TRUSTED_KEY, files separated by ':'."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeftError("signing needs the cryptography package: pip install 'edgeft[sign]'") from None
    return serialization, ed25519


def key_id(public_raw: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of sha256 over its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class TrustedKey:
    """A public key the user trusts, with where it came from."""

    id: str
    path: Path
    key: Any  # cryptography's Ed25519PublicKey


def _raw_public(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keygen(private_path: Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: ``private_path`` (PKCS#8 PEM, mode 0600) and ``private_path.pub``.

    Returns both paths and the key id. Refuses existing files unless ``overwrite``.
    """
    serialization, ed25519 = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise EdgeftError(f"{p} already exists (use --overwrite to replace it)")
    if not private_path.parent.is_dir():
        raise EdgeftError(f"{private_path.parent} is not a folder")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with os_errors_as_one_line(f"cannot write the key pair {private_path}", private_path.parent, len(pem) + len(pub)):
        atomic_write_files({private_path: (pem, 0o600), public_path: (pub, 0o644)})  # both or neither
    return private_path, public_path, key_id(_raw_public(key.public_key()))


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EdgeftError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise EdgeftError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_private_key(path: Path):
    """An Ed25519 private key from a PEM file, with a one-line error for anything else."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EdgeftError(f"{path} is an encrypted private key: edgeft reads unencrypted PKCS#8 keys "
                          "(edgeft keygen writes one)") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise EdgeftError(f"{path} is not a PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgeftError(f"{path} is not an Ed25519 key (edgeft keygen writes one)")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> list[TrustedKey]:
    """Public keys from PEM files (``edgeft keygen``'s ``.pub``); several allow key rotation."""
    serialization, ed25519 = _crypto()
    keys = []
    for path in paths:
        data = _read_key_file(path, "trusted key")
        try:
            key = serialization.load_pem_public_key(data)
        except Exception as exc:  # ValueError, UnsupportedAlgorithm
            raise EdgeftError(f"{path} is not a PEM public key ({type(exc).__name__})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise EdgeftError(f"{path} is not an Ed25519 public key")
        keys.append(TrustedKey(key_id(_raw_public(key)), Path(path), key))
    return keys


def sign_digest(private_key, digest: str) -> dict[str, str]:
    """The ``signature`` record for a manifest whose digest is ``digest``."""
    sig = private_key.sign(_CONTEXT + digest.encode())
    return {"algorithm": ALGORITHM, "key_id": key_id(_raw_public(private_key.public_key())),
            "value": base64.b64encode(sig).decode()}


def check_signature(where: str, signature: dict | None, digest: str, trusted: Sequence[TrustedKey]) -> str:
    """Raise unless ``signature`` is a valid signature of ``digest`` by one of ``trusted``; return its key id."""
    _crypto()
    from cryptography.exceptions import InvalidSignature

    ids = ", ".join(k.id for k in trusted)
    if not signature:
        raise EdgeftError(f"{where} is not signed; a trusted key ({ids}) accepts only signed artifacts "
                          "(edgeft sign ART --key KEY)")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise EdgeftError(f"{where}: unknown signature algorithm (edgeft signs with {ALGORITHM})")
    if set(signature) != set(FIELDS) or not all(isinstance(v, str) for v in signature.values()):
        raise EdgeftError(f"{where}: the signature record holds other fields than {', '.join(FIELDS)}")
    kid = signature["key_id"][:40]
    matches = [k for k in trusted if k.id == signature["key_id"]]
    if not matches:
        raise EdgeftError(f"{where} is signed by key {kid!r}, which is not a trusted key ({ids})")
    try:
        value = base64.b64decode(signature["value"], validate=True)
        if base64.b64encode(value).decode() != signature["value"]:  # one spelling only: no spare bits set
            raise ValueError("not canonical base64")
        matches[0].key.verify(value, _CONTEXT + digest.encode())
    except (InvalidSignature, ValueError):
        raise EdgeftError(f"{where}: the signature by key {kid} does not match the manifest "
                          "(changed after signing)") from None
    return kid
