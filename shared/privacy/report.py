"""`avrec audit report RUN_DIR`: the privacy facts of a run for a person (Markdown with an SVG figure) and
the same facts as JSON. Every number is recomputed from the verified ledgers, never read from the run's
own summaries; the report says so if verification failed."""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .accounting import RDP_ORDERS, SampledGaussian, _rdp_total, epsilon_checked, normalise
from .manifest import code_digest, config_digest
from .participation import client_histories, participation, user_epsilon
from .verify import DDG_SECURE_SUM, DP_FEDAVG_SECAGG, Verification, record_stats, verify_run

OUTSIDE = [
    "without DP only: the evaluation metrics each device sends every round (HR, NDCG, Recall on its "
    "held-out items, its training loss); under DP a device sends none of them, only whether it declined "
    "(a function of its ledger, i.e. of its participation); in simulation the harness reads them directly",
    "the choice of hyperparameters (noise multipliers, clip norms, learning rates, rounds) and of the best "
    "round by validation HR@10: made on the same users' data, outside the accounted mechanisms",
    "the evaluation of the final model (the test metrics of the table)",
    "the time a device takes to answer: DP-SGD's cost grows with its expected batch (record-sample-rate x its "
    "number of interactions), although the rate, steps, divisor and ledger do not depend on that number",
    "DP noise drawn by torch's generator seeded with 62 bits from the OS CSPRNG (Opacus's secure_mode needs "
    "torchcsprng, which has no build here): sound against an adversary who cannot recover that seed",
]


SELF_ATTESTATION = (
    "the ledgers are self-attested: a signature proves who wrote a record, not which noise ran. Each device "
    "records its own DP-SGD and history releases and the server its own DP-FedAvg rounds, so beyond the "
    "signatures an auditor must trust the device code that ran (and, for the user-level noise, the server code "
    "that ran: the code digest in the manifest is the server's own statement of it) and the OS CSPRNG that drew "
    "the sampling and seeded the noise. The empirical audit (`avrec audit empirical`) can refute a claim but "
    "never prove one"
)


def secure_aggregation_ran(v: Verification) -> bool:
    """Secure aggregation ran only where the configuration turned it on and every server ledger entry records
    a SecAgg+ round (`dp-fedavg-secagg`, or a `ddg-secure-sum` naming its protocol); SecAgg settings alone
    (they always have defaults) say nothing."""
    return (v.config.get("secure-aggregation") is True and bool(v.server_entries)
            and all(e.mechanism == DP_FEDAVG_SECAGG
                    or (e.mechanism == DDG_SECURE_SUM and bool(e.details.get("secure_aggregation")))
                    for e in v.server_entries))


def trust_model_ran(v: Verification) -> str:
    """Who added the user-level noise, from the ledger: `secure` only where every server entry is a DDG
    round (devices' shares, only their modular sum revealed); `central` for DP-FedAvg; `none` without it."""
    if not v.server_entries:
        return "none"
    return "secure" if all(e.mechanism == DDG_SECURE_SUM for e in v.server_entries) else "central"


def threat_model(v: Verification) -> dict[str, Any]:
    """What the server sees, whom each level protects against, what is public and what must be trusted,
    derived from what ran (the verified ledgers and the configuration), never from settings alone."""
    dp = v.config.get("dp", "none")
    record_dp, user_dp, secagg = dp in ("record", "both"), dp in ("user", "both"), secure_aggregation_ran(v)
    never = "never the device's data, private user vector or history summary"
    trust = trust_model_ran(v)
    if trust == "secure":
        how = ("the shares travelled masked by SecAgg+ (masks from a cryptographic PRG; secure aggregation ran: "
               "every entry names it), so only their sum was unmasked" if secagg else
               "no secure aggregation ran: the server computed that sum directly from shares that passed through the "
               "simulation process (a deployed device sends shares only under secure aggregation)")
        sees = ("only the modular sum of the devices' discrete Gaussian noise shares (trust-model = secure: every "
                "server ledger entry is a ddg-secure-sum round; each device added its share before its update left "
                f"it); {how}; {never}")
    elif secagg:
        sees = ("only the sum of each round's clipped, quantised updates (SecAgg+ secure aggregation ran: "
                "secure-aggregation = true and every server ledger entry is dp-fedavg-secagg), before it adds the "
                f"noise; never an individual update; {never}")
    else:
        noised = ", each already noised on the device by record-level DP-SGD" if record_dp else ""
        clipped = "clipped " if user_dp else ""
        sees = (f"every device's {clipped}shared-weight update in clear{noised} (no secure aggregation ran in this "
                f"run); {never}")
    protects = []
    if record_dp:
        protects.append("record-level DP protects each interaction against everything that leaves the device, "
                        "the server included: the device clips and noises before it sends")
    if user_dp and trust == "secure":
        protects.append("user-level DP protects each user against everyone who sees the released global models, the "
                        "server included, as long as enough devices add their shares: the accountant charges the "
                        "shares actually summed, and a round with fewer than secure-min-fraction of the expected "
                        "devices is not decoded; devices that collude with the server can subtract their own shares")
    elif user_dp:
        seen = ("the exact sum of the clipped updates before it adds the noise" if secagg
                else "every clipped update in clear")
        protects.append(f"user-level DP protects each user against everyone who sees the released global models, "
                        f"not against the server: the server sees {seen}")
    if not protects:
        protects.append("no differential privacy ran: nothing is protected by DP")
    public = []
    if user_dp:
        public.append("the population size and each round's participant set (node ids): the fixed DP-FedAvg "
                      "denominator counts the participant set, which is treated as public")
    if record_dp:
        public.append("the shape of DP-SGD (record-sample-rate, record-steps, the batch-size divisor) and the "
                      "history-release schedule, fixed by the configuration for every device, independent of its data")
    return {
        "server_sees": sees,
        "secure_aggregation_ran": secagg,
        "trust_model": trust,
        "protects": protects,
        "public": "; ".join(public) or "nothing beyond the run's configuration and the released models",
        "self_attestation": SELF_ATTESTATION,
        "secure_aggregation_settings": {k: val for k, val in v.config.items() if "secagg" in k or "secure" in k},
    }


def rho_bound(events: list[SampledGaussian]) -> tuple[float, str]:
    """rho-zCDP: exact for Gaussians without subsampling; otherwise the smallest rho with RDP(a) <= rho * a on
    Opacus's orders 1.1 to 63 (subsampled Gaussians have no closed-form rho; beyond order 63 it is not checked)."""
    hist = normalise(events)
    if not hist:
        return 0.0, "exact"
    if any(e.noise_multiplier == 0 for e in hist):
        return math.inf, "exact"
    if all(e.sample_rate == 1.0 for e in hist):
        return sum(e.steps / (2 * e.noise_multiplier**2) for e in hist), "exact (sum of steps / (2 sigma^2))"
    curve = _rdp_total(hist)
    return float(np.max(curve / np.asarray(RDP_ORDERS))), "max over RDP orders 1.1-63 of RDP(a)/a (not a full zCDP bound)"


def _record_by_round(v: Verification) -> list[dict[str, Any]]:
    rounds = sorted({e.round for entries in v.devices.values() for e in entries})
    cache: dict[tuple, float] = {}
    out = []
    for r in rounds:
        values = []
        for entries in v.devices.values():
            events = tuple(e.event() for e in entries if e.round <= r)
            if events not in cache:
                cache[events] = epsilon_checked(events, v.config["delta"]).epsilon
            values.append(cache[events])
        out.append({"round": r, **record_stats(values)})
    return out


def _ranges(values: list[float]) -> Any:
    values = sorted(set(values))
    return values[0] if len(values) == 1 else {"min": values[0], "max": values[-1], "distinct": len(values)}


def collect(run_dir: str | Path, server_key: str | None = None, devices: str | Path | None = None) -> dict[str, Any]:
    v = verify_run(run_dir, server_key, devices)
    cfg = v.config
    facts: dict[str, Any] = {
        "run_dir": str(v.run_dir),
        "verification": {"passed": v.ok, "problems": v.problems, "warnings": v.warnings},
        "dp": cfg.get("dp"),
        "threat_model": threat_model(v),
        "outside_the_guarantee": OUTSIDE,
        "accountants": {"reported": f"PLD, dp-accounting {importlib.metadata.version('dp-accounting')}",
                        "cross_checks": f"PRV and RDP, opacus {importlib.metadata.version('opacus')}",
                        "rule": "|PLD - PRV| <= max(0.02, 2% of PLD) and RDP >= PLD - that tolerance, else an error"},
        "hashes": {
            "config_sha256_recorded": v.manifest.get("config_sha256"),
            "config_sha256_of_recorded_config": config_digest(cfg) if cfg else None,
            "code_sha256_recorded": v.manifest.get("code_sha256"),
            "code_sha256_of_this_checkout": code_digest(),
        },
        "public_keys": {"server": v.server_key,
                        "devices": {name: key for name, key in sorted(v.device_keys.items())},
                        "device_ledgers_read_from": str(v.devices_root) if v.devices_root else None,
                        "trust": "the signatures show that records were written with these keys and not changed "
                                 "since; they are only as good as the channel that gave you the keys (pin the "
                                 "server's with --server-key) and the keys' secrecy"},
    }
    levels: dict[str, Any] = {}
    if v.devices:
        entries = [e for es in v.devices.values() for e in es]
        sgd = [e for e in entries if e.mechanism == "dp-sgd"]
        releases = [e for e in entries if e.mechanism != "dp-sgd"]
        eps = list(v.record_epsilons.values())
        rhos = {}
        for es in v.devices.values():
            key = tuple(e.event() for e in es)
            if key not in rhos:
                rhos[key] = rho_bound(list(key))
        rho_values = [r for r, _ in rhos.values()]
        levels["record"] = {
            "unit": "one interaction of one user",
            "neighbouring": entries[0].neighbouring,
            "devices": len(v.devices),
            "mechanisms": {
                "dp-sgd": {"noise_multiplier": _ranges([e.noise_multiplier for e in sgd]),
                           "clip_norm": _ranges([e.clip_norm for e in sgd]),
                           "sample_rate": _ranges([e.sample_rate for e in sgd]),
                           "steps_per_round": _ranges([e.steps for e in sgd]),
                           "step_groups": len(sgd)},
                "history-release": {"noise_multiplier": _ranges([e.noise_multiplier for e in releases]),
                                    "sensitivity": 1.0, "releases": len(releases)} if releases else None,
            },
            "sampling": {
                "method": _ranges([e.sampling for e in sgd]) if sgd else None,
                "amplification_claimed": any(e.amplification for e in sgd),
                "source": _ranges([str(e.details.get("sampling_source")) for e in sgd]) if sgd else None,
                "verified": "each entry's claim checked against the rule (Poisson, OS CSPRNG) by audit verify; "
                            "the draws themselves happen on the device and cannot be observed afterwards",
            },
            "epsilon": {"delta": cfg["delta"], **record_stats(eps)},
            "rho_zcdp": {"median": float(np.median(rho_values)), "max": max(rho_values),
                         "how": sorted({how for _, how in rhos.values()})},
            "by_round": _record_by_round(v),
            "budget": {"epsilon_budget": cfg.get("epsilon-budget"),
                       "enforced": "by each device before it trains (RDP bound: stops early, never late)"},
        }
    if v.server_entries:
        es = v.server_entries
        counts = participation(es)
        worst = max(client_histories(es).values(), key=len)
        amplified = [e.amplification for e in es]
        secure = trust_model_ran(v) == "secure"
        rho, how = (math.nan, "not computed: DDG rounds are accounted by their own RDP curve") if secure else rho_bound(list(worst))
        levels["user"] = {
            "unit": "all the data of one user (one client)",
            "neighbouring": es[0].neighbouring,
            "rounds": len(es),
            "mechanism": {
                "name": "distributed discrete Gaussian: update clipped, rotated and rounded on the device, which adds "
                        "its noise share; the modular sum of the shares over a fixed denominator" if secure else
                        "DP-FedAvg: update clipped on the device, Gaussian noise on the sum, fixed denominator",
                "noise_multiplier": _ranges([e.noise_multiplier for e in es]),
                "clip_norm": _ranges([e.clip_norm for e in es]),
                "population": _ranges([e.details.get("population") for e in es]),
                "clients_sampled": [e.details.get("sampled") for e in es],
                "clients_aggregated": [e.details.get("aggregated") for e in es],
                "denominator": _ranges([e.details.get("denominator") for e in es]),
            },
            "sampling": {
                "method": _ranges([e.sampling for e in es]),
                "amplification_claimed": all(amplified) if amplified else False,
                "why": "Poisson sampling from the OS CSPRNG (secrets.SystemRandom): amplification claimed"
                       if all(amplified) else
                       "no amplification claimed: every eligible client takes part in every round (fraction-train "
                       "= 1), which is not random sampling, so each round composes at full strength for the "
                       "clients chosen",
                "verified": "recorded sampling checked against the rule by audit verify; participation per round "
                            "is recorded (node ids) and checked against the cap and separation",
                "rounds_per_client": {"min": min(counts.values()), "max": max(counts.values())} if counts else None,
                "cap": cfg.get("max-rounds-per-client"), "min_separation": cfg.get("min-round-separation"),
            },
            "epsilon": {"delta": cfg["user-delta"], "value": v.user.epsilon, "pld": v.user.pld, "prv": v.user.prv,
                        "rdp": v.user.rdp, "of": "the most-charged client"},
            "rho_zcdp": {"value": rho, "how": how},
            "by_round": [{"round": e.round, "epsilon": user_epsilon([x for x in es if x.round <= e.round],
                                                                   cfg["user-delta"]).epsilon} for e in es],
            "budget": {"user_epsilon_budget": cfg.get("user-epsilon-budget"),
                       "enforced": "by the server before each round (RDP bound: stops early, never late)"},
        }
    facts["levels"] = levels
    facts["note"] = "the two levels protect different units and are never added"
    return facts


def svg_plot(facts: dict[str, Any], width: int = 640, height: int = 320) -> str:
    """Epsilon against rounds, hand-written SVG (no plotting library here)."""
    series = []
    rec = facts["levels"].get("record")
    if rec:
        series.append(("record level, max over devices", "#c0392b", [(r["round"], r["max"]) for r in rec["by_round"]]))
        series.append(("record level, median", "#e67e22", [(r["round"], r["median"]) for r in rec["by_round"]]))
    user = facts["levels"].get("user")
    if user:
        series.append(("user level", "#2c3e50", [(r["round"], r["epsilon"]) for r in user["by_round"]]))
    points = [p for _, _, s in series for p in s if math.isfinite(p[1])]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60"><text x="10" y="30">no DP in this run</text></svg>'
    x_max = max(p[0] for p in points)
    y_max = max(p[1] for p in points) * 1.1 or 1.0
    left, right, top, bottom = 50, 20, 20, 60
    sx = lambda x: left + (x / x_max) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - y / y_max) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<line x1="{left}" y1="{sy(0)}" x2="{width - right}" y2="{sy(0)}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{sy(0)}" stroke="black"/>',
           f'<text x="{(width) / 2}" y="{height - 28}" text-anchor="middle">round</text>',
           f'<text x="12" y="{top + 10}">epsilon</text>']
    for k in range(5):
        y = y_max * k / 4
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4}" text-anchor="end">{y:.2f}</text>')
    for x in sorted({p[0] for p in points}):
        out.append(f'<text x="{sx(x)}" y="{sy(0) + 14}" text-anchor="middle">{x}</text>')
    for i, (label, colour, pts) in enumerate(series):
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in [(0, 0.0)] + pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        out.append(f'<rect x="{left + 10 + 200 * i}" y="{height - 16}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{left + 24 + 200 * i}" y="{height - 7}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    return str(x)


def markdown(facts: dict[str, Any], figure: str) -> str:
    ver = facts["verification"]
    lines = [f"# Privacy audit report: `{facts['run_dir']}`", "",
             f"**Verification: {'passed' if ver['passed'] else 'FAILED'}.** Every number below is recomputed "
             "from the signed ledgers (`avrec audit verify`), not taken from the run's own summaries."]
    lines += [f"- problem: {p}" for p in ver["problems"]] + [f"- warning: {w}" for w in ver["warnings"]]
    lines += ["", f"DP mode: `{facts['dp']}`. {facts['note'].capitalize()}.", "", "## Threat model", "",
              f"- The server sees {facts['threat_model']['server_sees']}."]
    lines += [f"- {x[0].upper()}{x[1:]}." for x in facts["threat_model"]["protects"]]
    lines += [f"- Treated as public: {facts['threat_model']['public']}.",
              f"- Trust: {facts['threat_model']['self_attestation']}.", ""]
    for level, title in (("record", "Record level (on each device)"), ("user", "User level (on the server)")):
        f = facts["levels"].get(level)
        if not f:
            continue
        lines += [f"## {title}", "", f"- Unit of privacy: {f['unit']}; neighbouring relation: {f['neighbouring']}."]
        if level == "record":
            m = f["mechanisms"]
            lines.append(f"- DP-SGD ({f['devices']} devices, {m['dp-sgd']['step_groups']} step groups): noise multiplier "
                         f"{_fmt(m['dp-sgd']['noise_multiplier'])}, clip norm {_fmt(m['dp-sgd']['clip_norm'])}, sampling "
                         f"rate {_fmt(m['dp-sgd']['sample_rate'])}, steps per round {_fmt(m['dp-sgd']['steps_per_round'])}.")
            if m["history-release"]:
                lines.append(f"- History summary released with Gaussian noise (sensitivity 1): noise multiplier "
                             f"{_fmt(m['history-release']['noise_multiplier'])}, {m['history-release']['releases']} releases.")
            e = f["epsilon"]
            lines.append(f"- **Epsilon at delta {e['delta']:g}: median {e['median']:.4f}, 95th percentile {e['p95']:.4f}, "
                         f"maximum {e['max']:.4f}** over devices.")
            lines.append(f"- rho-zCDP: median {f['rho_zcdp']['median']:.4g}, max {f['rho_zcdp']['max']:.4g} "
                         f"({'; '.join(f['rho_zcdp']['how'])}).")
        else:
            m = f["mechanism"]
            lines.append(f"- {m['name']}: noise multiplier {_fmt(m['noise_multiplier'])}, clip norm {_fmt(m['clip_norm'])}, "
                         f"population {_fmt(m['population'])}, clients sampled per round {m['clients_sampled']}, "
                         f"aggregated {m['clients_aggregated']}, denominator {_fmt(m['denominator'])}.")
            e = f["epsilon"]
            lines.append(f"- **Epsilon at delta {e['delta']:g}: {e['value']:.4f}** ({e['of']}; PRV {e['prv']:.4f}, "
                         f"RDP {e['rdp']:.4f}) over {f['rounds']} rounds.")
            lines.append(f"- rho-zCDP: {f['rho_zcdp']['value']:.4g} ({f['rho_zcdp']['how']}).")
        s = f["sampling"]
        lines.append(f"- Sampling: {_fmt(s['method'])}; amplification claimed: {s['amplification_claimed']}. "
                     + (s.get("why", "") + ". " if s.get("why") else "") + f"Verified: {s['verified']}.")
        if level == "user" and s.get("rounds_per_client"):
            lines.append(f"- Rounds per client: {_fmt(s['rounds_per_client'])} (cap {s['cap'] or 'none'}, "
                         f"minimum separation {s['min_separation']}).")
        lines.append(f"- Budget: {_fmt(f['budget'])}.")
        lines.append("")
    lines += ["## Epsilon against rounds", "", "![epsilon against rounds](epsilon-rounds.svg)", "",
              "## Outside the guarantee", ""] + [f"- {x}" for x in facts["outside_the_guarantee"]]
    a, h = facts["accountants"], facts["hashes"]
    lines += ["", "## Accountants", "", f"- Reported: {a['reported']}; cross-checks: {a['cross_checks']}; {a['rule']}.",
              "", "## Hashes and keys", "",
              f"- Config SHA-256 recorded by the server: `{h['config_sha256_recorded']}` "
              f"({'equal to' if h['config_sha256_recorded'] == h['config_sha256_of_recorded_config'] else 'DIFFERENT from'} "
              "the hash of the configuration in federated.json).",
              f"- Code SHA-256 recorded by the server: `{h['code_sha256_recorded']}`; this checkout: "
              f"`{h['code_sha256_of_this_checkout']}` ({'same' if h['code_sha256_recorded'] == h['code_sha256_of_this_checkout'] else 'different'} code).",
              f"- Server public key: `{facts['public_keys']['server']}`; {len(facts['public_keys']['devices'])} device keys "
              f"in audit-report.json (device ledgers read from `{facts['public_keys']['device_ledgers_read_from']}`).", f"- Trusting them: {facts['public_keys']['trust']}.", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None, server_key: str | None = None,
                 devices: str | Path | None = None) -> list[Path]:
    facts = collect(run_dir, server_key, devices)
    out = Path(out) if out else Path(run_dir) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    figure = svg_plot(facts)
    (out / "epsilon-rounds.svg").write_text(figure)
    (out / "audit-report.json").write_text(json.dumps(facts, indent=1, default=str))
    (out / "audit-report.md").write_text(markdown(facts, figure))
    return [out / "audit-report.md", out / "audit-report.json", out / "epsilon-rounds.svg"]
