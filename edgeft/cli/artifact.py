"""``edgeft verify``, ``pack``, ``sign`` and ``keygen``: check an artifact, make one file of it, sign it. Torch-free.

``verify`` always hashes every byte and checks the manifest's digest; with trusted keys
(``--trusted-key`` or ``EDGEFT_TRUSTED_KEY``) it also wants a signature by one of them.
Signing needs the ``cryptography`` package (the ``sign`` extra, also part of ``runtime``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgeft.cli.app import app

TRUSTED_KEY_HELP = ("Public key (PEM, from edgeft keygen) whose signature the artifact must carry; repeat for "
                    "several (key rotation). Env: EDGEFT_TRUSTED_KEY, files separated by ':'.")


def trusted_key_option():
    return typer.Option([], "--trusted-key", envvar="EDGEFT_TRUSTED_KEY", show_default=False, help=TRUSTED_KEY_HELP)


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help="Artifact folder or packed .edgeft file."),
    trusted_key: list[Path] = trusted_key_option(),
) -> None:
    """Hash every file and check the manifest's digest (and signature); refuse a changed or truncated artifact."""
    from edgeft.artifact import verify as verify_folder, verify_packed
    from edgeft.errors import EdgeftError
    from edgeft.signing import load_trusted_keys

    if not artifact.exists():
        raise EdgeftError(f"{artifact} does not exist")
    keys = load_trusted_keys(trusted_key) if trusted_key else []
    manifest = verify_packed(artifact, keys) if artifact.is_file() else verify_folder(artifact, keys)
    gate = manifest.gate or {}
    state = "passed" if gate.get("passed") else ("DEGRADED" if gate.get("degraded") else "not gated")
    size = sum(meta["size"] for meta in manifest.files.values())
    sig = manifest.signature or {}
    if keys:
        trust = f"signed by trusted key {sig.get('key_id')}"
    elif sig:
        trust = f"signed by key {sig.get('key_id')} (not checked: give --trusted-key)"
    else:
        trust = "unsigned"
    digest = "digest ok" if manifest.digest else "no manifest digest (older artifact)"
    typer.echo(f"{artifact}: ok, {len(manifest.files)} files, {size / 1e6:.1f} MB; {manifest.task.value} "
               f"{manifest.architecture}, {manifest.quantization.get('scheme', '?')}, gate {state}; {digest}, {trust}")


@app.command()
def pack(
    artifact: Path = typer.Argument(..., help="Artifact folder to pack."),
    out: Path = typer.Option(None, "--out", "-o", show_default=False,
                             help="File to write (default: ARTIFACT.edgeft beside the folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Pack a verified artifact folder into one .edgeft file that the runtime opens directly."""
    from edgeft.artifact import PACK_SUFFIX, pack as pack_folder
    from edgeft.errors import EdgeftError

    if not artifact.is_dir():
        raise EdgeftError(f"{artifact} is not an artifact folder")
    out = out or artifact.with_name(artifact.name + PACK_SUFFIX)
    if out.exists() and not overwrite:
        raise EdgeftError(f"{out} already exists (use --overwrite to replace it)")
    if out.suffix != PACK_SUFFIX:
        raise EdgeftError(f"a packed artifact's name ends in {PACK_SUFFIX}: {out}")
    pack_folder(artifact, out)
    typer.echo(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")


@app.command()
def sign(
    artifact: Path = typer.Argument(..., help="Artifact folder or packed .edgeft file (signed in place)."),
    key: Path = typer.Option(..., "--key", "-k", help="Ed25519 private key (PEM, from edgeft keygen)."),
) -> None:
    """Verify every byte, then sign the manifest's digest with an Ed25519 key (adds a digest to an older artifact)."""
    from edgeft.artifact import sign as sign_artifact
    from edgeft.signing import load_private_key

    kid = sign_artifact(artifact, load_private_key(key))
    typer.echo(f"{artifact}: signed by key {kid}")


@app.command()
def keygen(
    out: Path = typer.Argument(..., help="Private key file to write (PEM, mode 0600); the public key goes to OUT.pub."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing key files."),
) -> None:
    """Write a new Ed25519 signing key pair (PKCS#8 private key, SubjectPublicKeyInfo public key, both PEM)."""
    from edgeft.signing import keygen as make_keys

    private, public, kid = make_keys(out, overwrite)
    typer.echo(f"{private} (private, keep it secret), {public} (public: give it to --trusted-key); key id {kid}")
