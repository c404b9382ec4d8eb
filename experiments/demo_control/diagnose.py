"""Where the demo's control accuracy is lost: the LAM, the world model, or the measurement.

    python experiments/demo_control/diagnose.py lam                 # LAM codes vs recorded actions
    python experiments/demo_control/diagnose.py ceiling --repeat 1  # IDM on real i.i.d. moves
    python experiments/demo_control/diagnose.py control CHECKPOINT  # a world under commands
    python experiments/demo_control/diagnose.py tokenizer CHECKPOINT  # real moves, tokenized

Every command reads the demo recipe's data settings (`common:` of conf/experiment/demo.yaml) and
its data cache; `lam` needs a demo run's latent-action cache (`--tokens`), `control` a world
model's checkpoint. Each prints a JSON object (and writes it with `--out`).

- lam: the LAM's code of each transition against the recorded action of the same transition and
  of the ones before and after (NMI per lag: does a code describe its own transition?), the
  action x code confusion and P(action | code) per split.
- ceiling: records a test split of the demo's data with `data.max_action_repeat=R` (R=1: a fresh
  move every recorded step, as i.i.d. commands are) and reports the demo IDM's accuracy on it:
  the control accuracy a perfect world would get under such commands.
- control: rolls a world out from 1 real frame for 8 frames under commands (i.i.d., held as
  the recipe's `eval.control.hold` says, and for a latent world held commands mapped per key
  by the recipe's onset codes, by the majority code and by P(key | code) over all transitions),
  reads them back with the IDM, and for a latent world holds each code for all 8 frames (what
  the world does with a fixed code, read by the IDM).
- tokenizer: the IDM on real transitions decoded from their tokens (each frame alone; one step
  from the real previous frame; chained over a clip as rollouts are decoded): what the token
  grid keeps of a move. CHECKPOINT: a world model's (its tokenizer) or a tokenizer's.

`--set k=v ...` adds overrides after the recipe's to every command (another recording, e.g.
`--set data.frame_skip=4 data.max_action_repeat=4`: the recipe before frame skip 8).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, default_collate

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.eval import world as W
from worldmodel.eval.clips import (
    EvalClips,
    PairedClips,
    eval_subset,
    pixel_val,
    token_val,
    true_action_mapping,
)
from worldmodel.eval.control import (
    cached_idm,
    control_confusion,
    control_labels,
    real_transition_accuracy,
)
from worldmodel.eval.metrics import normalized_mutual_information, onset_mapping
from worldmodel.train import checkpoint as ckpt
from worldmodel.world import World, decode_teacher_forced, decode_tokens

ROOT = Path(__file__).resolve().parents[2]
MOVES = [1, 2, 4, 5, 7, 8]  # CoinRun's distinct moves (data.action_set of the recipe)


def demo_data_overrides() -> list[str]:
    """The data and control settings of the demo recipe (its `common:` overrides of data.* and
    eval.control.*)."""
    recipe = yaml.safe_load((ROOT / "conf" / "experiment" / "demo.yaml").read_text())
    keep = ("data.", "eval.control.")
    return [o for o in recipe["common"] if o.lstrip("+").startswith(keep)]


EXTRA: list[str] = []  # --set: overrides after the recipe's (another recording, e.g.)


def compose_demo(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(
            "config", overrides=["data=procgen", *demo_data_overrides(), *EXTRA, *overrides]
        )


def demo_idm(train):
    """The demo's IDM, as `task=eval` trains and caches it (the defaults of eval.control)."""
    cfg = compose_demo()
    c = cfg.eval.control
    return cached_idm(train, 15, int(c.steps), int(c.batch_size), c.max_epochs, int(cfg.seed))


def lam_report(tokens: str) -> dict:
    source = instantiate(compose_demo("data.clip_length=2").data)
    out = {}
    for split in ("train", "val"):
        clips = source.split(split)
        true = np.load(clips.actions_path)
        codes = np.load(Path(clips.folder) / tokens / f"{split}_latent_actions.npy")
        lags = {}
        for lag in (-2, -1, 0, 1):  # code of transition t against the action of t + lag
            c = codes[max(0, -lag) : len(codes) - max(0, lag)]
            a = true[max(0, lag) : len(true) - max(0, -lag)]
            keep = (c >= 0) & (a >= 0)
            lags[lag] = normalized_mutual_information(
                torch.from_numpy(a[keep]), torch.from_numpy(c[keep])
            )
        keep = codes >= 0
        num_codes = int(codes.max()) + 1
        confusion = np.stack(
            [np.bincount(codes[keep & (true == m)], minlength=num_codes) for m in MOVES]
        )
        posterior = confusion / np.maximum(confusion.sum(0, keepdims=True), 1)
        out[split] = {
            "nmi_by_lag": lags,
            "confusion": confusion.tolist(),
            "p_action_given_code": np.round(posterior, 3).tolist(),
            "repeat_share": float((true[1:] == true[:-1]).mean()),
        }
    out["moves"] = MOVES
    return out


def ceiling_report(repeat: int) -> dict:
    cfg = compose_demo(
        f"data.max_action_repeat={repeat}",
        "data.clip_length=2",
        "data.train_frames=512",  # the train split is unused: a small one records fast
        "data.val_frames=256",
    )
    train = instantiate(compose_demo("data.clip_length=2").data).split("train")
    idm = demo_idm(train)
    test = instantiate(cfg.data).split("test")
    return {
        "max_action_repeat": repeat,
        "test_transitions": len(test),
        "idm_accuracy_real": real_transition_accuracy(idm, test, batch_size=256),
    }


@torch.no_grad()
def control_report(checkpoint: str, split: str, batches: int, fixed_batches: int) -> dict:
    cfg = compose_demo(
        "data.clip_length=9",
        f"eval.batches={batches}",
        "eval.batch_size=16",
    )
    world = World.load(checkpoint)
    pixels = pixel_val(cfg.data, split)
    tokens = token_val(world, pixels)
    control = W._control_setup(world, cfg, pixels, tokens)
    num_true = len(control.table)
    # the recipe's table (`control.table`: a latent world's keys to their onset codes, learned on
    # the validation split) beside the tables of the previous recipes, learned on the train split
    tables = {"recipe": control.table.clone()}
    report: dict = {"checkpoint": checkpoint, "split": split, "source": world.action_source}
    if world.action_source == "latent":
        train_px = pixel_val(cfg.data, "train")
        confusion, by_majority = true_action_mapping(
            train_px, token_val(world, train_px), world.num_actions
        )
        by_posterior = onset_mapping(confusion)  # P(key | code), here over all transitions
        tables["majority"] = torch.full((num_true,), -1, dtype=torch.long)
        tables["posterior"] = torch.full((num_true,), -1, dtype=torch.long)
        for a in MOVES:
            tables["majority"][a] = by_majority[a]
            tables["posterior"][a] = by_posterior[a]
    report["tables"] = {k: {m: int(v[m]) for m in MOVES} for k, v in tables.items()}
    hold = int(cfg.eval.control.hold)  # the recipe's: commands held 1..hold steps
    variants = [("iid", 1, "recipe"), (f"held{hold}", hold, "recipe")]
    if "posterior" in tables:
        variants.append((f"held{hold}_majority", hold, "majority"))
        variants.append((f"held{hold}_posterior", hold, "posterior"))
    hits = {name: [] for name, _, _ in variants}
    confusions = {name: torch.zeros(num_true, num_true, dtype=torch.long) for name in hits}
    fixed = torch.zeros(world.num_actions, num_true, dtype=torch.long)
    gen = world.generator(int(cfg.seed))
    sampling = W.Sampling(4, 0.0, gen)  # greedy, 4 MaskGIT steps: the demo's evaluation
    indices = list(eval_subset(pixels, cfg).indices)
    loader = DataLoader(EvalClips(PairedClips(tokens, pixels), indices), batch_size=16)

    def read(video, actions, tok, commanded, commands):
        fake = W._rollout(world, tok, commanded, 1, 8, sampling, world.bf16, video[:, :, 0])
        before, after = W._command_transitions(video, fake, 1, 1, 8)
        return control_labels(control.idm, before, after, commands)

    for i, batch in enumerate(loader):
        tok, actions, video = batch["tokens"], batch["actions"], batch["video"]
        b = tok.shape[0]
        for name, hold, table in variants:
            control.hold = hold
            commands = control.draw((b, 8), gen)  # (B, 8) true action ids
            commanded = W._replace_tail(actions, 1, tables[table][commands])
            labels = read(video, actions, tok, commanded, commands)
            hits[name].append((labels == commands).double().mean(dim=1))
            confusions[name] += control_confusion(commands, labels, num_true)
        if world.action_source == "latent" and i < fixed_batches:
            for code in range(world.num_actions):
                held = torch.full((b, 8), code, dtype=torch.long)
                labels = read(
                    video, actions, tok, W._replace_tail(actions, 1, held), torch.zeros_like(held)
                )
                fixed[code] += torch.bincount(labels.flatten(), minlength=num_true)
    for name in hits:
        per_clip = torch.cat(hits[name])
        report[name] = {
            "control_accuracy": float(per_clip.mean()),
            "clips": len(per_clip),
            "confusion": confusions[name][MOVES][:, MOVES].tolist(),
            "read_outside_moves": int(
                confusions[name].sum() - confusions[name][MOVES][:, MOVES].sum()
            ),
        }
    if fixed.sum() > 0:
        report["fixed_code_read"] = fixed[:, MOVES].tolist()
    report["moves"] = MOVES
    return report


@torch.no_grad()
def tokenizer_report(checkpoint: str, split: str, batches: int) -> dict:
    """The IDM on real transitions passed through a tokenizer (a world model's, or a tokenizer
    checkpoint's; the recorded actions): each frame decoded alone from its tokens, frame t+1
    decoded from its tokens with the real frame t (one step), and a whole clip decoded from its
    tokens after its real first frame (chained, as a rollout decodes)."""
    cfg = compose_demo("data.clip_length=9", f"eval.batches={batches}", "eval.batch_size=16")
    pixels = pixel_val(cfg.data, split)
    if "pipeline" in ((ckpt.load(checkpoint).get("config") or {}).get("model") or {}):
        tokenizer = World.load(checkpoint).tokenizer
    else:
        tokenizer = load_model(checkpoint)[0]
    idm = demo_idm(instantiate(compose_demo("data.clip_length=2").data).split("train"))
    indices = list(eval_subset(pixels, cfg).indices)
    hits: dict[str, list] = {"real": [], "per_frame": [], "one_step": [], "chained": []}
    confusions = {k: torch.zeros(15, 15, dtype=torch.long) for k in hits}
    for i in range(0, len(indices), 16):
        batch = default_collate([pixels[j] for j in indices[i : i + 16]])
        video, true = batch["video"], batch["actions"][:, :-1]
        ids = tokenizer.tokenize(video)  # (B, 9, h, w)
        alone = decode_tokens(tokenizer, ids, bf16=False)
        chained = decode_tokens(tokenizer, ids[:, 1:], bf16=False, previous=video[:, :, 0])
        pairs = {
            "real": (video[:, :, :-1], video[:, :, 1:]),
            "per_frame": (alone[:, :, :-1], alone[:, :, 1:]),
            "one_step": (
                video[:, :, :-1],
                decode_teacher_forced(tokenizer, ids[:, 1:], video[:, :, :-1], bf16=False),
            ),
            "chained": (torch.cat([video[:, :, :1], chained[:, :, :-1]], dim=2), chained),
        }
        for name, (before, after) in pairs.items():
            labels = control_labels(idm, before, after, true)
            hits[name].append(labels[true >= 0] == true[true >= 0])
            confusions[name] += control_confusion(true, labels, 15)
    return {
        "checkpoint": checkpoint,
        "split": split,
        "data": demo_data_overrides() + EXTRA,
        **{
            name: {
                "idm_accuracy": float(torch.cat(h).double().mean()),
                "transitions": int(torch.cat(h).numel()),
                "confusion": confusions[name][MOVES][:, MOVES].tolist(),
            }
            for name, h in hits.items()
        },
        "moves": MOVES,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["lam", "ceiling", "control", "tokenizer"])
    p.add_argument("checkpoint", nargs="?", help="control: a world model's checkpoint")
    p.add_argument("--tokens", default="", help="lam: the latent-action cache folder's name")
    p.add_argument("--repeat", type=int, default=1, help="ceiling: data.max_action_repeat")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=8, help="control: batches of 16 clips")
    p.add_argument("--fixed-batches", type=int, default=2, help="control: for fixed codes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--set", nargs="*", default=[], help="overrides after the recipe's, e.g. data.frame_skip=4"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    EXTRA.extend(args.set)
    if args.what == "lam":
        report = lam_report(args.tokens)
    elif args.what == "ceiling":
        report = ceiling_report(args.repeat)
    elif not args.checkpoint:
        p.error(f"{args.what} needs a world model's checkpoint")
    elif args.what == "tokenizer":
        report = tokenizer_report(args.checkpoint, args.split, args.batches)
    else:
        report = control_report(args.checkpoint, args.split, args.batches, args.fixed_batches)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
