"""Mean over several workspaces (RegDB's 10 split trials): ``python -m dmdl_cli.evaluation.summary WS...``.

Reads each workspace's newest evaluation of its final checkpoint (``eval/<mode>-stage2-final.json``,
else ``stage1-final``) and prints Rank-1/5/10/20, mAP and mINP as mean ± std over workspaces.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dmdl_cli.console import console
from dmdl_cli.errors import DmdlError
from dmdl_cli.evaluation.evaluate import results_table

CHECKPOINTS = ("stage2-final", "stage1-final")


def collect(workspaces: list[Path]) -> dict[str, list[dict]]:
    """{mode: [per-workspace mean result, ...]} over the workspaces."""
    by_mode: dict[str, list[dict]] = {}
    for ws in workspaces:
        found = False
        for name in CHECKPOINTS:
            for path in sorted((ws / "eval").glob(f"*-{name}.json")):
                data = json.loads(path.read_text())
                if data["protocol"].get("rerank") or data["protocol"].get("shots", 1) != 1:
                    continue
                by_mode.setdefault(data["protocol"]["mode"], []).append(data["mean"])
                found = True
            if found:
                break
        if not found:
            raise DmdlError(f"{ws}/eval holds no evaluation of a final checkpoint: run `dmdl evaluate "
                            f"--workspace {ws} --mode all` first")
    return by_mode


def summarise(results: list[dict]) -> dict:
    cmc = np.array([r["cmc"] for r in results], dtype=np.float64)
    maps = np.array([r["mAP"] for r in results])
    minps = np.array([r["mINP"] for r in results])
    return {"cmc": cmc.mean(0), "cmc_std": cmc.std(0), "mAP": maps.mean(), "mAP_std": maps.std(),
            "mINP": minps.mean(), "mINP_std": minps.std(), "trials": len(results)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        console.print("usage: python -m dmdl_cli.evaluation.summary WORKSPACE [WORKSPACE ...]")
        return 2
    try:
        by_mode = collect([Path(a) for a in args])
    except DmdlError as err:
        console.print(f"[bold red]error:[/] {err}")
        return 1
    rows = [(mode, summarise(results)) for mode, results in sorted(by_mode.items())]
    console.print(results_table(f"mean over {len(args)} workspaces (± std over workspaces)", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
