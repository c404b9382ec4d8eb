"""Game movements and the model actions they send, shared by the play front-ends.

A movement is a true action of the game; the model's action for it comes from the world: the
identity for a world trained on the recorded actions, else the LAM's learned mapping the world
carries (`World.true_to_model_actions`: for each true action, the latent code most specific to it
where a recorded move starts, `eval.metrics.onset_mapping`). Movements that share noop's model
action are flagged (`as_noop`).
"""

from __future__ import annotations

from typing import Any

from worldmodel.world import World

# procgen's 15 actions are button combinations (`env.get_combos()` order): 0 LEFT+DOWN, 1 LEFT,
# 2 LEFT+UP, 3 DOWN, 4 none, 5 UP, 6 RIGHT+DOWN, 7 RIGHT, 8 RIGHT+UP, 9 D, 10 A, 11 W, 12 S, 13 Q,
# 14 E. These are the plain movements; UP is the jump in CoinRun and the platformers.
PROCGEN_MOVES = {"left": 1, "down": 3, "noop": 4, "up": 5, "right": 7}
# two arrow keys held together (the web page): the diagonal button combinations
PROCGEN_COMBOS = {"left+down": 0, "left+up": 2, "right+down": 6, "right+up": 8}


def known_mapping(world: World) -> dict[int, int]:
    """True action id -> model action id as far as the world itself knows it (no data read):
    the identity for a world on recorded actions, else the mapping it carries (maybe empty)."""
    if world.action_source == "true":
        return {a: a for a in range(world.num_actions)}
    return dict(world.true_to_model_actions)


def world_moves(world: World, keys: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Movement -> {"true": id, "model": id, "as_noop": bool} for the movements the world can
    play; `as_noop` marks a movement whose model action is noop's (a key that cannot be told from
    standing still).

    `keys` (movement -> true action id) overrides the default, procgen's movements and diagonal
    combinations on procgen worlds (none on others: their digits still reach every action).
    """
    if keys is None:
        data = world.config.get("data") or {}
        keys = {**PROCGEN_MOVES, **PROCGEN_COMBOS} if data.get("name") == "procgen" else {}
    mapping = known_mapping(world)
    moves = {
        move: {"true": int(true_id), "model": mapping[int(true_id)]}
        for move, true_id in keys.items()
        if int(true_id) in mapping
    }
    # a latent world may map a move to the code it plays for standing still (the demo's LAM
    # gives "left" and "noop" one code): that key does nothing a player could tell from noop
    noop = moves.get("noop")
    for move, entry in moves.items():
        entry["as_noop"] = noop is not None and move != "noop" and entry["model"] == noop["model"]
    return moves


def moves_like_noop(world: World, keys: dict[str, int] | None = None) -> list[str]:
    """The movements of `world_moves` that send the model the same action as "noop"."""
    return [move for move, entry in world_moves(world, keys).items() if entry["as_noop"]]
