"""Secure aggregation on the deployment engine: five SuperNodes (one MovieLens-100K user each) behind a
TLS SuperLink with node authentication, dp = user, SecAgg+ (5 shares, threshold 3), 2 rounds. With
`secagg-audit` each device keeps the update it sent and the server the unmasked sum: prints the largest
difference against the plain sum and the quantisation bound, and the round times. Saves
runs/deploy_secagg.json. Run: `python -m simulations.deploy_secagg`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from shared.config import RunConfig
from shared.data.resolve import resolve_dataset
from shared.deploy.config import load_deploy_settings
from shared.deploy.credentials import make_certificates, make_node_key
from shared.deploy.local import LocalFederation
from shared.deploy.partition import partition
from shared.processes import free_port

REPO = Path(__file__).resolve().parents[1]
DEVICES = 5


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="avrec-secagg-") as tmp:
        root = Path(tmp)
        data = partition(resolve_dataset(RunConfig()), root / "data", DEVICES, 1)
        certs = make_certificates(root / "certs")
        keys = [make_node_key(root / "keys" / f"device-{k}") for k in range(DEVICES)]
        settings = load_deploy_settings(table={
            "federation": {"flwr-home": str(root / "flwr-home")},
            "superlink": {"port": free_port(), "ca-cert": str(certs.ca_cert), "certificate": str(certs.server_cert),
                          "private-key": str(certs.server_key)},
            "run": {"dataset": str(data.catalogue), "out": str(root / "run"), "num-rounds": 2, "dp": "user",
                    "min-clients": DEVICES, "secure-aggregation": True, "secagg-audit": True},
        })
        with LocalFederation(settings, root / "processes") as federation:
            federation.start_superlink()
            for key in keys:
                federation.register(key.public)
            for k in range(DEVICES):
                federation.start_supernode(f"supernode-{k}", data_dir=data.devices[k], private_key=keys[k].private)
            result = federation.run(REPO, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"flwr run failed: {federation.log('flwr-run').read_text()[-2000:]}")
        cfg = settings.run
        step = 2 * cfg.user_clip_norm / 2**cfg.secagg_quantization_bits
        rounds = []
        for line in (root / "run" / "rounds.jsonl").read_text().splitlines():
            row = json.loads(line)
            r = row["round"]
            secure = load_file(root / "run" / f"secure-sum-round-{r}.safetensors")
            sent = [load_file(p) for p in sorted((root / "data").glob(f"device-*/state/sent-round-{r}.safetensors"))]
            error = max((secure[k] - sum(u[k].double() for u in sent)).abs().max().item() for k in secure)
            rounds.append({"round": r, "seconds": row["seconds"], "aggregated": row["clients_aggregated"],
                           "max_abs_error_vs_plain_sum": error, "bound": len(sent) * step,
                           "user_epsilon": row["user_epsilon"]})
    report = {"supernodes": DEVICES, "num_shares": cfg.secagg_num_shares,
              "reconstruction_threshold": cfg.secagg_reconstruction_threshold, "rounds": rounds}
    out = REPO / "runs" / "deploy_secagg.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
