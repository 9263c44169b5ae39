"""Packs the Python packages the lent GPU machine lacks into parts that each fit one device call, and unpacks them there.

The device machine (issue 17's measurement) runs CPython 3.12 with torch, numpy, pyarrow, an older
transformers and most of the scientific stack, but without Ray, deltalake, duckdb, pycocotools,
pydantic or the engine's own entry points, and it reaches no package index. A call carries at most
64 MiB, and the 30 wheels the engine needs there are 206 MB. So ``pack`` fetches them here for that
machine's platform, at the versions installed here (what the tests ran), installs each with
``pip --target``, trims what a local run never loads (Ray's Java jars, its dashboard's web page and
the libraries built on it), strips symbols no dynamic linking needs, packs each package with xz,
and deals the archives into parts under the size of a call: ``.device/1``, ``.device/2``, ...

    python benchmarks/device_bundle.py pack                                   # for the GPU machine (cp312)
    python benchmarks/device_bundle.py pack --python 3.11 --out /tmp/bundle   # for this machine, to try it
    python3 benchmarks/device_bundle.py unpack .device/1 --site /tmp/site     # there: one call per part

``unpack`` adds a part to the site folder, which outlives a call while the machine stays warm; it exits 0
once every part of the same bundle is there, and 3, naming the missing parts, before.
``benchmarks/device_run.sh`` wraps it. Only the standard library is imported: ``unpack`` runs before
anything else is there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    # The executor (local, no dashboard: Ray's core needs jsonschema besides what the device has).
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    # The store and the catalog.
    "deltalake",
    "arro3-core",
    "deprecated",
    "duckdb",
    # Masks and config.
    "pycocotools",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    # The device's transformers (5.17) predates the SAM 3 classes the engine pins (>= 5.24).
    "transformers",
    # Imported when the stage package registers every stage: SAM 3's offline tokenizer reads open_clip's
    # vocabulary; mining, dedup and the CLIP stages need the rest.
    "open-clip-torch",
    "ftfy",
    "wcwidth",
    "faiss-cpu",
    "imagehash",
    "pywavelets",
    "inflect",
    "more-itertools",
    "typeguard",
    "jaraco-functools",
    "textblob",
    "nltk",
    # Small ones whose minimum versions the packages above state (pydantic-core, Ray, transformers): the
    # device's own may be older, and these come first on PYTHONPATH.
    "typing-extensions",
    "packaging",
    "regex",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TRIMMED = ("ray/jars", "ray/dashboard/client/build", "ray/rllib", "ray/serve", "ray/tune", "ray/train", "ray/llm")
"""Parts of Ray a local executor never imports: Java workers, the dashboard's web page, the libraries on top."""
PART_MIB = 56
"""A call carries 64 MiB in all: the checkout (a few MiB) travels with each part."""
MANIFEST = "bundle.json"
INCOMPLETE = 3


def pip(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *argv], check=True)


def pinned() -> list[str]:
    try:
        return [f"{name}=={version(name)}" for name in PACKAGES]
    except PackageNotFoundError as missing:
        sys.exit(f"device_bundle: {missing.name} is not installed here; install the project first (pip install -e .)")


def strip_symbols(folder: Path) -> int:
    """Strip the symbols no dynamic linking needs from every ELF file (Ray ships them in); bytes saved."""
    saved = 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as file:
            if file.read(4) != b"\x7fELF":
                continue
        before = path.stat().st_size
        if subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True).returncode == 0:
            saved += before - path.stat().st_size
    return saved


def pack_one(wheel: Path, tags: list[str], work: Path) -> tuple[Path, int]:
    """One wheel installed, trimmed, stripped and packed: its archive, and the bytes of symbols stripped."""
    site = work / "site" / wheel.name
    pip("install", "--no-deps", "--no-compile", *tags, "--target", str(site), str(wheel))
    for part in TRIMMED:
        shutil.rmtree(site / part, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter in them
    stripped = strip_symbols(site)
    archive = work / "archives" / (wheel.name.split("-")[0] + ".tar.xz")
    archive.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(site), "-I", "xz -9 -T0", "-cf", str(archive), "."], check=True)
    shutil.rmtree(site)
    return archive, stripped


def deal(archives: list[Path], limit: int) -> list[list[Path]]:
    """Archives into as few parts under ``limit`` bytes as first-fit by size gives."""
    parts: list[list[Path]] = []
    for archive in sorted(archives, key=lambda a: -a.stat().st_size):
        size = archive.stat().st_size
        if size > limit:
            sys.exit(f"device_bundle: {archive.name} alone is {size / 2**20:.1f} MiB, over a part's {limit / 2**20:.0f} MiB")
        home = next((p for p in parts if sum(a.stat().st_size for a in p) + size <= limit), None)
        if home is None:
            parts.append(home := [])
        home.append(archive)
    return parts


def pack(python: str, out: Path) -> None:
    tags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        tags += ["--platform", platform]
    pins = pinned()
    bundle = hashlib.sha256("\n".join([python, *pins]).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory(prefix="device-bundle-") as tmp:
        work, wheels = Path(tmp), Path(tmp, "wheels")
        pip("download", "--no-deps", *tags, "-d", str(wheels), *pins)
        # The engine's own metadata: its stages are found through an entry point, whichever copy of the code runs.
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO))
        packed = [pack_one(wheel, tags, work) for wheel in sorted(wheels.glob("*.whl"))]
        archives = [archive for archive, _ in packed]
        shutil.rmtree(out, ignore_errors=True)
        parts = deal(archives, PART_MIB * 2**20)
        for number, part in enumerate(parts, 1):
            folder = out / str(number)
            folder.mkdir(parents=True)
            for archive in part:
                shutil.move(archive, folder / archive.name)
            manifest = {
                "bundle": bundle,
                "python": python,
                "part": number,
                "parts": len(parts),
                "archives": [a.name for a in part],
                "pins": pins,
            }
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
            size = sum(a.stat().st_size for a in folder.iterdir()) / 2**20
            print(f"{folder}: {size:.1f} MiB, {', '.join(a.name.removesuffix('.tar.xz') for a in part)}")
    stripped = sum(saved for _, saved in packed) / 2**20
    print(f"bundle {bundle} for CPython {python}: {len(parts)} part(s), one device call each; {stripped:.0f} MiB of symbols stripped")


def unpack(parts: list[Path], site: Path) -> int:
    """Add ``parts`` to ``site``; 0 once every part of their bundle is there, else INCOMPLETE."""
    arrived = site / ".parts"
    arrived.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not (part / MANIFEST).is_file():
            sys.exit(f"device_bundle: {part} holds no {MANIFEST}: carry a part folder that pack made (.device/1 ...)")
        manifest = json.loads((part / MANIFEST).read_text())
        for name in manifest["archives"]:
            with tarfile.open(part / name) as archive:
                archive.extractall(site, filter="tar")
        (arrived / f"{manifest['bundle']}-{manifest['part']}.json").write_text(json.dumps(manifest))
    have = {int(p.stem.split("-")[1]) for p in arrived.glob(f"{manifest['bundle']}-*.json")}
    missing = sorted(set(range(1, manifest["parts"] + 1)) - have)
    if missing:
        print(f"device_bundle: part(s) {', '.join(map(str, missing))} of {manifest['parts']} missing: carry and unpack them next")
        return INCOMPLETE
    print(f"device_bundle: all {manifest['parts']} part(s) of bundle {manifest['bundle']} in {site}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="Build the parts here.")
    packing.add_argument("--python", default="3.12", help="The device's CPython version (3.12).")
    packing.add_argument("--out", type=Path, default=REPO / ".device", help="Folder for the parts (ignored by git).")
    unpacking = verbs.add_parser("unpack", help="Add parts to the site folder (on the device).")
    unpacking.add_argument("parts", type=Path, nargs="+", help="Part folders, as carried (.device/1 ...).")
    unpacking.add_argument("--site", type=Path, required=True, help="Folder to put on PYTHONPATH.")
    args = parser.parse_args()
    if args.verb == "pack":
        pack(args.python, args.out)
    else:
        sys.exit(unpack(args.parts, args.site))


if __name__ == "__main__":
    main()
