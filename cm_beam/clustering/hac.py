"""Reciprocal-nearest-neighbour (RNN) average-linkage HAC rounds as Beam stages.

The pool is split in spatial shards; a cluster's state lives in the shard encoded
in its id (`hac_kernels.shard_of`). One element per shard carries

    {"clusters": hac_kernels.Clusters (count, sum, sum of squared norms, label),
     "members":  (owner cluster id, point id) arrays,
     "src", "dst": candidate edges leaving the shard's clusters (both directions of
                   every undirected edge are stored, one at each end's shard)}.

A round is four keyed stages (one GroupByKey each):

1. Nearest: every shard sends each neighbouring shard the state of its clusters
   adjacent to it ("ghosts"), so each shard computes the exact float64 linkage of
   all its edges (in a canonical orientation, so both ends get bit-identical values),
   drops edges above eps, finds each cluster's nearest candidate (ties within
   `hac_kernels.tie_keys` broken by `hac_kernels.pair_priority`), and retires clusters
   with no candidate left (their members are final);
2. Match: each cluster tells its nearest's shard "I chose you"; reciprocal pairs merge
   into the smaller id; losers send their state to the winner's shard and a rename
   notice to the shards of their neighbours;
3. Relabel: winners absorb losers; edges are renamed, a loser's edges move to the
   winner's shard;
4. Collect: moved edges join their new shard; self-loops and duplicates drop.

The stage that builds a round's state (InitialState, then each Collect) also routes
it: when an upper bound of the candidate edges left (counted by the stage before, so
no extra pass over the state is needed) is at most `max_inmemory_edges`, the whole
remainder goes to one worker and finishes in memory (`hac_kernels.hac_in_memory`,
the same round semantics). After `max_rounds` Beam
rounds the remainder must fit that bound, or the job fails naming both flags.
Spatial shards keep most edges, and so most messages, inside one shard.

Every merge is logged where it happens (Relabel, which holds both sides' state before
the merge, and the finish) as `hierarchy_kernels.Merges` blocks: the two public labels,
the exact linkage that made the pair reciprocal nearest, the merged size and the round.
"""

from __future__ import annotations

from typing import Dict

import apache_beam as beam
import numpy as np

from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.clustering import knn_kernels as kk
from cm_beam.array_ops import unique_sorted
from cm_beam.clustering.hac_kernels import Clusters, lookup, shard_of
from cm_beam.runtime.stage_timer import StageTimer

_EMPTY = np.zeros(0, np.int64)


def _state(clusters, members, src, dst) -> Dict:
    return {"clusters": clusters, "members": members, "src": src, "dst": dst}


def _assignments(clusters: Clusters, members):
    """Final rows for retired clusters: per member point, (label, size)."""
    owner, points = members
    pos = lookup(clusters.ids, owner)
    return points, clusters.labels[pos], clusters.counts[pos]


def _emit_done(clusters: Clusters, members):
    """Tagged outputs for retired clusters: assignment blocks per point shard + sizes."""
    if len(clusters) == 0:
        return
    points, labels, sizes = _assignments(clusters, members)
    shards = shard_of(points)
    for s in unique_sorted(shards):
        m = shards == s
        yield beam.pvalue.TaggedOutput("done", (int(s), {"points": points[m], "labels": labels[m], "sizes": sizes[m]}))
    yield beam.pvalue.TaggedOutput("sizes", clusters.counts)
    yield beam.pvalue.TaggedOutput("final_state", clusters)


def _take_members(members, owner_ids):
    owner, points = members
    m = np.isin(owner, owner_ids)
    return (owner[m], points[m]), (owner[~m], points[~m])


# --- Initial state -------------------------------------------------------------

def _symmetric_edges(kv):
    """kNN edges (top-k per src) -> both directions, keyed by the shard of each end."""
    _, block = kv
    src = np.concatenate([block["src"], block["dst"]])
    dst = np.concatenate([block["dst"], block["src"]])
    shards = shard_of(src)
    for s in unique_sorted(shards):
        m = shards == s
        yield int(s), ("edges", (src[m], dst[m]))


def _directed_bound(kv) -> int:
    """Upper bound of the directed edges one shard's kNN lists become: pairs inside the
    shard are counted once however many of their ends listed them (spatial shards keep
    most pairs inside), pairs that cross shards once per listing."""
    _, block = kv
    src, dst = np.asarray(block["src"]), np.asarray(block["dst"])
    inside = shard_of(src) == shard_of(dst)
    pairs, _ = _directed_unique(np.minimum(src[inside], dst[inside]), np.maximum(src[inside], dst[inside]))
    return 2 * (len(pairs) + int((~inside & (src != dst)).sum()))


def _initial_state(kv, metric, directed_bound, max_inmemory_edges, force_finish):
    shard, items = kv
    blocks, nodes, srcs, dsts = [], [], [], []
    for tag, value in items:
        if tag == "points":
            (nodes if "nodes" in value else blocks).append(value)
        else:
            srcs.append(value[0]); dsts.append(value[1])
    if not blocks and not nodes:
        if srcs:  # never legitimate: every edge starts at a point of this shard
            raise AssertionError(f"shard {shard}: {sum(len(x) for x in srcs)} edges arrived without the shard's points")
        return []
    # Weighted starting nodes (cm-cluster --extend: existing clusters), then the points. A
    # point may stand for several identical ones (build_clusters folds exact duplicates):
    # count c, sum c * v, squared norms c * |v|^2 (exact linkage state).
    parts = [b["nodes"] for b in nodes]
    folded = [b["folded"] for b in blocks if "folded" in b]
    if blocks:
        ids = np.concatenate([b["ids"] for b in blocks])
        labels = np.concatenate([b["labels"] for b in blocks])
        vecs = np.concatenate([kk.prepared_vectors(b, np.float64) for b in blocks])
        counts = np.concatenate([b.get("counts", np.ones(len(b["ids"]), np.int64)) for b in blocks])
        sq = np.einsum("ij,ij->i", vecs, vecs) * counts if metric == "sqeuclidean" else np.zeros(len(ids))
        parts.append(Clusters(ids, counts, vecs * counts[:, None], sq, labels))
    clusters = Clusters.concat(parts, parts[0].sums.shape[1])
    owner = np.concatenate([clusters.ids] + [f[0] for f in folded])
    points = np.concatenate([clusters.ids] + [f[1] for f in folded])
    src = np.concatenate(srcs) if srcs else _EMPTY
    dst = np.concatenate(dsts) if dsts else _EMPTY
    if not force_finish:  # the finish deduplicates every edge itself (dense_canonical_edges)
        src, dst = _directed_unique(src, dst)
    return _route(shard, _state(clusters, (owner, points), src, dst),
                  directed_bound, max_inmemory_edges, force_finish, 0)


def _directed_unique(src, dst):
    keep = src != dst
    src, dst = src[keep], dst[keep]
    if len(src) == 0:
        return _EMPTY, _EMPTY
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    first = np.ones(len(src), bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return src[first], dst[first]


# --- Routing: Beam round or in-memory finish -------------------------------------

def _route(shard, state, directed_bound, max_inmemory_edges, force_finish, next_round):
    """The stage that builds a round's state also routes it, so the state (float64
    sums: most of the bytes) is not shipped once more just to be routed. The count
    is an upper bound of the directed edges (taken before duplicates drop), so the
    finish may come one round later than an exact count would allow; `_finish`
    checks the exact count. `next_round` numbers the finish's rounds after the Beam
    rounds in the merge log."""
    state["next_round"] = next_round
    if force_finish or directed_bound // 2 <= max_inmemory_edges:
        return [beam.pvalue.TaggedOutput("finish", state)]
    return [(shard, state)]


# --- Round stage 1: ghosts and nearest candidates -------------------------------

def _send_ghosts(kv):
    shard, st = kv
    yield shard, ("state", st)
    c, src, dst = st["clusters"], st["src"], st["dst"]
    dshard = shard_of(dst)
    for q in unique_sorted(dshard):
        if q == shard:
            continue
        need = unique_sorted(src[dshard == q])
        pos = lookup(c.ids, need)
        if (pos < 0).any():  # edges must start at this shard's own clusters
            raise AssertionError(f"shard {shard}: {int((pos < 0).sum())} edge sources are not its clusters "
                                 f"(e.g. {int(need[pos < 0][0])} of shard {int(shard_of(need[pos < 0][:1])[0])})")
        yield int(q), ("ghost", c.take(pos))


def _nearest(kv, eps, metric, round_index, tie_scale):
    shard, items = kv
    st, ghosts = None, []
    for tag, value in items:
        if tag == "state":
            st = value
        else:
            ghosts.append(value)
    if st is None:
        return
    with StageTimer("hac_rounds"):
        c, src, dst = st["clusters"], st["src"], st["dst"]
        d = c.sums.shape[1]
        table = Clusters.concat([c] + ghosts, d) if ghosts else c
        # Canonical orientation (smaller id first): both ends compute the same bits.
        a, b = np.minimum(src, dst), np.maximum(src, dst)
        ia, ib = lookup(table.ids, a), lookup(table.ids, b)
        if (ia < 0).any() or (ib < 0).any():  # adjacency must be symmetric: a bug otherwise
            miss = np.concatenate([a[ia < 0], b[ib < 0]])
            raise AssertionError(
                f"shard {shard}: {len(miss)} edges' far ends sent no state (e.g. id {int(miss[0])} of shard "
                f"{int(shard_of(miss[:1])[0])}; far shards missing {sorted(set(shard_of(miss).tolist()))}; "
                f"ghosts from {sorted(set(shard_of(np.concatenate([g.ids for g in ghosts])).tolist())) if ghosts else []}; "
                f"own clusters {len(c)}, edges {len(src)})")
        link = hk.edge_linkage(table, ia, table, ib, metric)
        keep = link <= eps
        yield beam.pvalue.TaggedOutput("stats", ((round_index, "edges"), len(src)))
        src, dst, link = src[keep], dst[keep], link[keep]
        has, nn, nn_link = hk.nearest_candidates(src, dst, link, round_index, tie_scale)
        active = np.isin(c.ids, has)
        retired = c.take(~active)
        members_retired, members = _take_members(st["members"], retired.ids)
        for out in _emit_done(retired, members_retired):
            yield out
        c = c.take(active)
        yield beam.pvalue.TaggedOutput("stats", ((round_index, "active"), len(c)))
        pos = lookup(has, c.ids)
        nn_full, link_full = nn[pos], nn_link[pos]
        nshard = shard_of(nn_full)
        remote = nshard != shard
        for q in unique_sorted(nshard[remote]):
            m = nshard == q
            yield int(q), ("choice", (c.ids[m], nn_full[m]))
        st = _state(c, members, src, dst)
        st["nn"] = nn_full
        st["nn_link"] = link_full  # the height of the merge, if this pair is reciprocal
        yield shard, ("state", st)


# --- Round stage 2: reciprocal pairs --------------------------------------------

def _match(kv, round_index):
    shard, items = kv
    st, choosers, targets = None, [], []
    for tag, value in items:
        if tag == "state":
            st = value
        else:
            choosers.append(value[0]); targets.append(value[1])
    if st is None:
        return
    with StageTimer("hac_rounds"):
        c, nn = st["clusters"], st["nn"]
        local = shard_of(nn) == shard
        ch = np.concatenate(choosers + [c.ids[local]])
        tg = np.concatenate(targets + [nn[local]])
        order = np.argsort(ch, kind="stable")
        ch, tg = ch[order], tg[order]
        pos = lookup(ch, nn)
        recip = (pos >= 0) & (tg[np.maximum(pos, 0)] == c.ids) if len(ch) else np.zeros(len(c), bool)
        is_loser = recip & (nn < c.ids)
        losers, winners, heights = c.ids[is_loser], nn[is_loser], st["nn_link"][is_loser]
        yield beam.pvalue.TaggedOutput("stats", ((round_index, "merges"), int(is_loser.sum())))
        if len(losers):
            lost = c.take(is_loser)
            members_lost, members = _take_members(st["members"], losers)
            # The loser's state goes to its winner's shard (maybe this one).
            wshard = shard_of(winners)
            for q in unique_sorted(wshard):
                m = wshard == q
                sub_ids = losers[m]
                mo, mp = members_lost
                mm = np.isin(mo, sub_ids)
                yield int(q), ("absorb", (winners[m], lost.take(m), (mo[mm], mp[mm]), heights[m]))
            # Rename notices to every shard holding an edge that points at a loser:
            # the shards of the loser's neighbours (adjacency is symmetric), and
            # this shard (the loser's own edges are renamed and moved from here).
            src, dst = st["src"], st["dst"]
            on_loser = np.isin(src, losers)
            nshard = shard_of(dst[on_loser])
            nsrc = src[on_loser]
            for q in unique_sorted(np.concatenate([nshard, [shard]])):
                olds = unique_sorted(nsrc[nshard == q]) if q != shard else losers
                yield int(q), ("rename", (olds, winners[lookup(losers, olds)]))
            st = _state(c.take(~is_loser), members, src, dst)
        else:
            st = _state(c, st["members"], st["src"], st["dst"])
        yield shard, ("state", st)


# --- Round stage 3: absorb merged clusters and relabel edges --------------------

def _relabel(kv, round_index):
    shard, items = kv
    st, absorbs, olds, news = None, [], [], []
    for tag, value in items:
        if tag == "state":
            st = value
        elif tag == "absorb":
            absorbs.append(value)
        else:
            olds.append(value[0]); news.append(value[1])
    if st is None:
        return
    with StageTimer("hac_rounds"):
        c = st["clusters"]
        owner, points = st["members"]
        owners, pts = [owner], [points]
        d = c.sums.shape[1]
        if absorbs:
            winners = np.concatenate([a[0] for a in absorbs])
            lost = Clusters.concat([a[1] for a in absorbs], d)
            # Clusters.concat sorts by id: reorder winners to match.
            lost_ids = np.concatenate([a[1].ids for a in absorbs])
            winners = winners[np.argsort(lost_ids, kind="stable")]
            # The merge log, from both sides' state before the merge.
            pw = lookup(c.ids, winners)
            if (pw < 0).any():
                raise AssertionError(f"shard {shard}: a loser chose a winner that is not in the winner's shard")
            heights = np.concatenate([a[3] for a in absorbs])[np.argsort(lost_ids, kind="stable")]
            yield beam.pvalue.TaggedOutput("merges", hik.Merges.from_pairs(
                c.labels[pw], lost.labels, heights, c.counts[pw] + lost.counts, round_index))
            merged = Clusters.concat([c, lost], d)
            c = hk.merge_clusters(merged, winners, lost.ids)
            for w_ids, l_state, (mo, mp), _ in absorbs:
                w_of = w_ids[lookup(l_state.ids, mo)]
                owners.append(w_of); pts.append(mp)
        members = (np.concatenate(owners), np.concatenate(pts))
        src, dst = st["src"], st["dst"]
        if olds:
            old = np.concatenate(olds)
            new = np.concatenate(news)
            old, first = np.unique(old, return_index=True)
            new = new[first]
            ps, pd = lookup(old, src), lookup(old, dst)
            src = np.where(ps >= 0, new[np.maximum(ps, 0)], src)
            dst = np.where(pd >= 0, new[np.maximum(pd, 0)], dst)
        sshard = shard_of(src)
        stay = sshard == shard
        moved = 0
        for q in unique_sorted(sshard[~stay]):
            m = sshard == q
            msrc, mdst = _directed_unique(src[m], dst[m])  # fewer bytes, and a tighter count
            moved += len(msrc)
            yield int(q), ("edges", (msrc, mdst))
        # Staying edges drop their duplicates here, so the count that routes the next
        # round (`_route`) is nearly exact; moved ones are deduplicated by Collect.
        src, dst = _directed_unique(src[stay], dst[stay])
        yield beam.pvalue.TaggedOutput("edge_count", len(src) + moved)
        yield shard, ("state", _state(c, members, src, dst))


# --- Round stage 4: collect moved edges ------------------------------------------

def _collect(kv, directed_bound, max_inmemory_edges, force_finish, next_round):
    shard, items = kv
    st, srcs, dsts = None, [], []
    for tag, value in items:
        if tag == "state":
            st = value
        else:
            srcs.append(value[0]); dsts.append(value[1])
    if st is None:
        return []
    with StageTimer("hac_rounds"):
        src, dst = _directed_unique(np.concatenate([st["src"]] + srcs), np.concatenate([st["dst"]] + dsts))
    return _route(shard, _state(st["clusters"], st["members"], src, dst), directed_bound, max_inmemory_edges,
                  force_finish, next_round)


# --- In-memory finish --------------------------------------------------------------

def _finish(kv, eps, metric, max_inmemory_edges, max_rounds, tie_scale):
    _, states = kv
    states = list(states)
    if not states:
        return
    with StageTimer("hac_finish"):
        d = states[0]["clusters"].sums.shape[1]
        clusters = Clusters.concat([s["clusters"] for s in states], d)
        owner = np.concatenate([s["members"][0] for s in states])
        points = np.concatenate([s["members"][1] for s in states])
        u = np.concatenate([s["src"] for s in states])
        v = np.concatenate([s["dst"] for s in states])
        first_round = states[0]["next_round"]  # every shard routes to the finish in the same stage
        if any(s["next_round"] != first_round for s in states):
            raise AssertionError("shards reached the in-memory finish after different rounds")
        try:
            final, (losers, winners), stats, _, log = hk.hac_in_memory(
                clusters, u, v, eps, metric, max_edges=max_inmemory_edges, return_merges=True,
                first_round=first_round, tie_scale=tie_scale)
        except hk.TooManyEdges as e:
            raise RuntimeError(
                f"cm-cluster: {e.edges} candidate edges are left after --max_rounds={max_rounds} rounds, "
                f"more than --max_inmemory_edges={max_inmemory_edges} allows on one worker; "
                "raise --max_rounds (or --max_inmemory_edges if one worker has the memory)"
            ) from None
        for i, s in enumerate(stats):
            yield beam.pvalue.TaggedOutput("stats", (("inmemory", i, "edges"), s.edges))
            yield beam.pvalue.TaggedOutput("stats", (("inmemory", i, "active"), s.active))
            yield beam.pvalue.TaggedOutput("stats", (("inmemory", i, "merges"), s.merges))
        if len(log["size"]):
            yield beam.pvalue.TaggedOutput("merges", hik.Merges.from_pairs(
                log["label_w"], log["label_l"], log["height"], log["size"], first_round + log["round"]))
        owner = hk.resolve_parents(owner, losers, winners)
        for out in _emit_done(final, (owner, points)):
            yield out


class HacRounds(beam.PTransform):
    """Average-linkage HAC cut at eps over sharded points and candidate edges.

    Input: a dict {"points": (shard, {"ids", "labels", "vecs", "normalise", "center"[, "counts",
                   "folded"]}) (counts: points a row stands for; folded: (row id, point id)
                   of the points it stands for besides itself), or
                   (shard, {"nodes": hac_kernels.Clusters}) weighted starting nodes
                   (their members are the nodes themselves),
                   "edges":  (shard, {"src", "dst", ...})} of PCollections.
    Output: {"assignments": (shard, {"points", "labels", "sizes"}) for every point,
             "sizes": int64 arrays of final cluster sizes,
             "merges": hierarchy_kernels.Merges blocks, every merge made (see that module),
             "final_state": hac_kernels.Clusters blocks, the state of every final cluster,
             "stats": ((round, name), value) summed per key}.
    `tie_scale` (a float or a singleton side input): linkages closer than
    tie_scale * hac_kernels.TIE_RESOLUTION are ties (`hac_kernels.tie_keys`).

    Example:
        hac = {"points": shard_blocks, "edges": graph["edges"]} | HacRounds(
            eps=0.2, metric="cosine", max_rounds=16, max_inmemory_edges=2_000_000)
    """

    def __init__(self, eps: float, metric: str, max_rounds: int, max_inmemory_edges: int, tie_scale=1.0):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if metric not in hk.METRICS:
            raise ValueError(f"metric must be one of {hk.METRICS}, got {metric!r}")
        if max_rounds < 0 or max_inmemory_edges < 0:
            raise ValueError("max_rounds and max_inmemory_edges must be >= 0")
        self._eps, self._metric = float(eps), metric
        self._max_rounds, self._max_inmemory = int(max_rounds), int(max_inmemory_edges)
        self._tie_scale = tie_scale

    def expand(self, inputs):
        eps, metric = self._eps, self._metric
        points = inputs["points"] | "TagPoints" >> beam.Map(lambda kv: (kv[0], ("points", kv[1])))
        # Each stage that builds a round's state routes it: to the next Beam round, or
        # to the in-memory finish once the (bounded) edge count fits one worker.
        if self._max_rounds:
            edges = inputs["edges"] | "SymmetricEdges" >> beam.FlatMap(_symmetric_edges)
            knn_directed = (
                inputs["edges"]
                | "CountKnnEdges" >> beam.Map(_directed_bound)
                | "SumKnnEdges" >> beam.CombineGlobally(sum)
            )
        else:
            # Straight to the in-memory finish, which takes each undirected edge once
            # (`hac_kernels.dense_canonical_edges`): no reverse directions, no count.
            edges = inputs["edges"] | "TagEdges" >> beam.Map(
                lambda kv: (kv[0], ("edges", (kv[1]["src"], kv[1]["dst"]))))
            knn_directed = inputs["edges"].pipeline | "NoKnnEdgeCount" >> beam.Create([0])
        routed = (
            (points, edges)
            | "FlattenInit" >> beam.Flatten()
            | "GroupInit" >> beam.GroupByKey()
            | "InitialState" >> beam.FlatMap(
                _initial_state, metric, beam.pvalue.AsSingleton(knn_directed), self._max_inmemory,
                self._max_rounds == 0).with_outputs("finish", main="round")
        )
        done, sizes, stats, finish, merges, final_state = [], [], [], [routed.finish], [], []
        state = routed.round
        for r in range(self._max_rounds):
            nearest = (
                state
                | f"R{r}Ghosts" >> beam.FlatMap(_send_ghosts)
                | f"R{r}GroupGhosts" >> beam.GroupByKey()
                | f"R{r}Nearest" >> beam.FlatMap(_nearest, eps, metric, r, self._tie_scale).with_outputs(
                    "done", "sizes", "stats", "final_state", main="state")
            )
            done.append(nearest.done); sizes.append(nearest.sizes); stats.append(nearest.stats)
            final_state.append(nearest.final_state)
            matched = (
                nearest.state
                | f"R{r}GroupChoices" >> beam.GroupByKey()
                | f"R{r}Match" >> beam.FlatMap(_match, r).with_outputs("stats", main="state")
            )
            stats.append(matched.stats)
            relabeled = (
                matched.state
                | f"R{r}GroupMerges" >> beam.GroupByKey()
                | f"R{r}Relabel" >> beam.FlatMap(_relabel, r).with_outputs("edge_count", "merges", main="moves")
            )
            merges.append(relabeled.merges)
            directed = relabeled.edge_count | f"R{r}SumEdges" >> beam.CombineGlobally(sum)
            routed = (
                relabeled.moves
                | f"R{r}GroupMoved" >> beam.GroupByKey()
                | f"R{r}Collect" >> beam.FlatMap(
                    _collect, beam.pvalue.AsSingleton(directed), self._max_inmemory,
                    r == self._max_rounds - 1, r + 1).with_outputs("finish", main="round")
            )
            finish.append(routed.finish)
            state = routed.round
        finished = (
            finish
            | "FlattenFinish" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda st: (0, st))
            | "GroupFinish" >> beam.GroupByKey()
            | "FinishInMemory" >> beam.FlatMap(
                _finish, eps, metric, self._max_inmemory, self._max_rounds, self._tie_scale
            ).with_outputs("done", "sizes", "stats", "merges", "final_state")
        )
        done.append(finished.done); sizes.append(finished.sizes); stats.append(finished.stats)
        final_state.append(finished.final_state)
        merges.append(finished.merges)
        return {
            "assignments": done | "FlattenDone" >> beam.Flatten(),
            "sizes": sizes | "FlattenSizes" >> beam.Flatten(),
            "merges": merges | "FlattenMerges" >> beam.Flatten(),
            "final_state": final_state | "FlattenFinalState" >> beam.Flatten(),
            "stats": stats | "FlattenStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum),
        }
