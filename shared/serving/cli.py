"""`avrec recommend RUN_DIR --user ID`: a device's top-k with explanations and its interest tags."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _format(user_id: str, recs, interests, user, changed: bool) -> str:
    tags = ", ".join(f"{t} {w:.2f}" for t, w in interests.tags.items()) or "none yet"
    edits = interests.edits
    lines = [
        f"user {user_id}: {len(user.history)} events on this device; private vector {user.private_source}",
        f"interest tags: {tags}",
    ]
    if edits.added or edits.removed:
        lines.append(f"  edited by the user{' (saved now)' if changed else ''}: "
                     f"added {', '.join(edits.added) or '-'}; removed {', '.join(edits.removed) or '-'}")
    for rank, r in enumerate(recs, 1):
        bonus = f" (tag bonus {r.rank_score - r.score:+.2f})" if r.rank_score != r.score else ""
        lines.append(f"{rank:>2}. {r.title} [{r.item_id}]  score {r.score:.3f}{bonus}")
        if r.because:
            lines.append("    because you watched: " + "; ".join(f"{t} ({c:+.3f})" for t, c in r.because))
        lines.append("    score by part: " + ", ".join(
            f"{k} {r.contributions[k]:+.3f} ({s:.0%})" for k, s in r.shares.items()))
        if r.tags:
            lines.append("    matches your tags: " + ", ".join(r.tags))
        if r.sentiment:
            lines.append(f"    tone of its text: {r.sentiment:+.2f} (VADER, -1 negative to +1 positive)")
    return "\n".join(lines)


def _recommend(args: argparse.Namespace) -> int:
    from client.serving import DeviceRecommender, ServingError

    try:
        device = DeviceRecommender.from_run(args.run_dir, args.model, args.dataset)
        user = device.user(args.user)
        if args.add_tag or args.remove_tag:
            device.interests(user).edits.edit(args.add_tag, args.remove_tag).save(user.state_dir)
        recs, interests, user = device.recommend(args.user, args.k, args.tag_boost, args.explain, args.diversity)
    except (ServingError, ValueError) as exc:
        print(f"avrec recommend: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"user": args.user, "interest_tags": interests.tags,
                          "edits": asdict(interests.edits),
                          "recommendations": [{**asdict(r), "shares": r.shares} for r in recs]}, indent=1))
    else:
        print(_format(args.user, recs, interests, user, bool(args.add_tag or args.remove_tag)))
    return 0


def register(commands) -> None:
    p = commands.add_parser("recommend", help="a user's recommendations, computed on their device",
                            description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a run directory written by `avrec simulate`")
    p.add_argument("--user", required=True, help="user id (as in interactions.csv)")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--explain", type=int, default=3, help="history items named per recommendation (default 3)")
    p.add_argument("--add-tag", action="append", default=[], metavar="TAG", help="add an interest tag (saved on the device)")
    p.add_argument("--remove-tag", action="append", default=[], metavar="TAG", help="remove an interest tag (saved)")
    p.add_argument("--tag-boost", type=float, default=1.0,
                   help="score bonus per added tag an item carries, minus it per removed tag (default 1.0; 0 = off)")
    p.add_argument("--diversity", type=float, default=0.0,
                   help="MMR re-ranking for spread in content space, 0 (the model's order, default) to 1")
    p.add_argument("--model", choices=("global", "best"), default="global",
                   help="global: the last round's weights, as devices hold them (default); best: the best validation round's")
    p.add_argument("--dataset", type=Path, default=None,
                   help="serve this dataset instead of the run's: its catalogue with new items appended to items.csv "
                        "(ranked from their content, embedded on the device by `avrec embed`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_recommend)
