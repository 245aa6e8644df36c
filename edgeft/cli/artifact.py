"""``edgeft verify``, ``pack``, ``sign`` and ``keygen``: check an artifact, make one file of it, sign it. Torch-free.

``verify`` always hashes every byte and checks the manifest's digest; with trusted keys
(``--trusted-key`` or ``EDGEFT_TRUSTED_KEY``) it also wants a signature by one of them.
Signing needs the ``cryptography`` package (the ``sign`` extra, also part of ``runtime``).
Each command's flags are the fields of its small config below (``edgeft.cli.options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.flags import flag
from edgeft.signing import TrustedKeys


@dataclass(frozen=True)
class VerifyConfig(TrustedKeys):
    """``edgeft verify``."""

    artifact: Path = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file."""


@dataclass(frozen=True)
class PackConfig:
    """``edgeft pack``."""

    artifact: Path = field(metadata=flag(argument=True))
    """Artifact folder to pack."""
    out: Path | None = field(default=None, metadata=flag("--out", "-o"))
    """File to write (default: ARTIFACT.edgeft beside the folder)."""
    overwrite: bool = False
    """Replace an existing file."""


@dataclass(frozen=True)
class SignConfig:
    """``edgeft sign``."""

    artifact: Path = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file (signed in place)."""
    key: Path = field(metadata=flag("--key", "-k"))
    """Ed25519 private key (PEM, from edgeft keygen)."""


@dataclass(frozen=True)
class KeygenConfig:
    """``edgeft keygen``."""

    out: Path = field(metadata=flag(argument=True))
    """Private key file to write (PEM, mode 0600); the public key goes to OUT.pub."""
    overwrite: bool = False
    """Replace existing key files."""


@app.command()
@from_config(VerifyConfig)
def verify(config: VerifyConfig) -> None:
    """Hash every file and check the manifest's digest (and signature); refuse a changed or truncated artifact."""
    from edgeft.artifact import verify as verify_folder, verify_packed
    from edgeft.errors import EdgeftError
    from edgeft.signing import load_trusted_keys

    artifact = config.artifact
    if not artifact.exists():
        raise EdgeftError(f"{artifact} does not exist")
    keys = load_trusted_keys(config.trusted_keys) if config.trusted_keys else []
    manifest = verify_packed(artifact, keys) if artifact.is_file() else verify_folder(artifact, keys)
    gate = manifest.gate
    state = "passed" if gate and gate.passed else ("DEGRADED" if gate and gate.degraded else "not gated")
    size = sum(meta["size"] for meta in manifest.files.values())
    sig = manifest.signature if isinstance(manifest.signature, dict) else {}
    kid = ascii(str(sig.get("key_id", "?")))[1:-1][:40]  # unchecked without a trusted key: kept one short line
    if keys:
        trust = f"signed by trusted key {kid}"
    elif sig:
        trust = f"signed by key {kid} (not checked: give --trusted-key)"
    else:
        trust = "unsigned"
    digest = "digest ok" if manifest.digest else "no manifest digest (older artifact)"
    typer.echo(f"{artifact}: ok, {len(manifest.files)} files, {size / 1e6:.1f} MB; {manifest.task.value} "
               f"{manifest.architecture}, {manifest.quantization.scheme or '?'}, gate {state}; {digest}, {trust}")
    if manifest.trunk is not None:
        typer.echo(trunk_line(manifest))


def trunk_line(manifest) -> str:
    """What a split artifact shares: its trunk's digest and boundary, and the size of each part."""
    t = manifest.trunk

    def mb(*names: str) -> str:
        return f"{sum(int(manifest.files.get(n, {}).get('size', 0)) for n in names) / 1e6:.1f} MB"

    top = [n for n in manifest.files if n == manifest.graph.file or n.startswith(manifest.graph.file + ".")]
    h = manifest.head
    head = "" if h is None else f"; head {h.sha256} ({h.file}, {mb(h.file)}): the base's LM head, loaded once too"
    return (f"  trunk {t.sha256} ({t.file}, {mb(t.file)}): the embeddings and the first {t.blocks} blocks, "
            f"loaded once for every model that carries this digest{head}; top {manifest.graph.file} ({mb(*top)}): "
            "this model's own")


@app.command()
@from_config(PackConfig)
def pack(config: PackConfig) -> None:
    """Pack a verified artifact folder into one .edgeft file that the runtime opens directly."""
    from edgeft.artifact import PACK_SUFFIX, pack as pack_folder
    from edgeft.errors import EdgeftError

    artifact = config.artifact
    if not artifact.is_dir():
        raise EdgeftError(f"{artifact} is not an artifact folder")
    out = config.out or artifact.resolve().with_name(artifact.resolve().name + PACK_SUFFIX)  # "." has no name
    if out.exists() and not config.overwrite:
        raise EdgeftError(f"{out} already exists (use --overwrite to replace it)")
    if out.suffix != PACK_SUFFIX:
        raise EdgeftError(f"a packed artifact's name ends in {PACK_SUFFIX}: {out}")
    pack_folder(artifact, out)
    typer.echo(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")


@app.command()
@from_config(SignConfig)
def sign(config: SignConfig) -> None:
    """Verify every byte, then sign the manifest's digest with an Ed25519 key (adds a digest to an older artifact)."""
    from edgeft.artifact import sign as sign_artifact
    from edgeft.signing import load_private_key

    kid = sign_artifact(config.artifact, load_private_key(config.key))
    typer.echo(f"{config.artifact}: signed by key {kid}")


@app.command()
@from_config(KeygenConfig)
def keygen(config: KeygenConfig) -> None:
    """Write a new Ed25519 signing key pair (PKCS#8 private key, SubjectPublicKeyInfo public key, both PEM)."""
    from edgeft.signing import keygen as make_keys

    private, public, kid = make_keys(config.out, config.overwrite)
    typer.echo(f"{private} (private, keep it secret), {public} (public: give it to --trusted-key); key id {kid}")
