"""``edgeft verify`` and ``edgeft pack``: check an artifact's checksums, make one file of it. Torch-free."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeft.cli.app import app


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help="Artifact folder or packed .edgeft file."),
) -> None:
    """Recompute every checksum in the manifest; refuse a tampered or truncated artifact."""
    from edgeft.artifact import open_artifact

    folder, manifest = open_artifact(artifact)
    gate = manifest.gate or {}
    state = "passed" if gate.get("passed") else ("DEGRADED" if gate.get("degraded") else "not gated")
    size = sum(meta["size"] for meta in manifest.files.values())
    typer.echo(f"{artifact}: ok, {len(manifest.files)} files, {size / 1e6:.1f} MB; {manifest.task.value} "
               f"{manifest.architecture}, {manifest.quantization.get('scheme', '?')}, gate {state}")


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
