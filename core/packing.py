"""Packed rows: several sequences in one row of a batch, each computing exactly what its own row would.

Two layouts, one mechanism:

- shared prefix (`prefix_row`): ``[prompt][response 1][response 2]...``, the prompt once. The reward model's
  one row (Llama 3: a prompt and its 2-3 ranked responses) and DPO's prefix sharing (prompt, chosen,
  rejected) use it. Each response sees the prompt and itself, never another response, and its position ids
  continue from the prompt's end:

      key ->        prompt   resp 1   resp 2
      prompt        causal   -        -
      resp 1        all      causal   -
      resp 2        all      -        causal

- documents (`document_row`): ``[conv 1][conv 2]...``, packed SFT. Each sees only itself, its position ids
  restart at 0.

Every token carries a document id and a branch: branch 0 is a document's shared part (the prompt; a whole
SFT conversation), branch k >= 1 its k-th response. Query q may attend to key k when

    k <= q  and  doc[k] == doc[q]  and  (branch[k] == 0 or branch[k] == branch[q])

which with the position ids makes every token see the same keys at the same positions as in its own row.
Pad positions (doc -1) attend only to themselves (a fully masked row would give NaN) and nothing attends to
them. The mask is 4D additive float ([B, 1, T, T], 0 = attend, finfo.min = masked): transformers passes a 4D
mask to the attention function untouched, eager attention adds it to the scores and SDPA takes it as
`attn_mask`. Packed SFT needs no mask of ours: transformers builds the same block-diagonal mask from
position ids that restart, when attention_mask is None (`masking_utils.find_packed_sequence_indices`).

Each sequence of a row is a path through it (`Row.where[j]`: the row positions of sequence j's tokens, in
order: the prompt's, then its response's), so anything per token of a sequence (a loss mask, a reward
position) is placed by `place`, and the token that predicts token t of a sequence is the one before it on
its path (`Row.prev`): for a response's first token, the prompt's last token, wherever the response sits.
core.logps reads `prev_pos` instead of assuming that position t - 1 predicts token t.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from data.chat_format import Encoded

PAD_DOC = -1  # the document id of pad positions


@dataclass
class Row:
    """One packed row, every list as long as the row; `where[j]` lists the row positions of sequence j."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)  # position ids
    doc: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)
    prev: list[int] = field(default_factory=list)  # the row position whose output predicts this token; -1: none
    where: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def _add(self, ids: list[int], pos: list[int], doc: int, branch: int, before: int) -> list[int]:
        """Append tokens; the first one is predicted by row position `before` (-1: none). Returns their positions."""
        at = list(range(len(self.ids), len(self.ids) + len(ids)))
        self.ids += ids
        self.pos += pos
        self.doc += [doc] * len(ids)
        self.branch += [branch] * len(ids)
        self.prev += [before] + at[:-1] if ids else []
        return at


def split_prompt(encs: list[Encoded]) -> tuple[list[int], list[list[int]]]:
    """(shared prompt ids, each response's ids): the longest common prefix of the encodings, cut at the
    earliest `prompt_len` (the prompt with its assistant header), and what follows it in each."""
    first = encs[0].input_ids
    n = min(e.prompt_len for e in encs)
    for e in encs[1:]:
        k = 0
        while k < n and e.input_ids[k] == first[k]:
            k += 1
        n = k
    return first[:n], [e.input_ids[n:] for e in encs]


def prefix_row(encs: list[Encoded], rng: random.Random | None = None, doc: int = 0) -> Row:
    """The prompt once, then each response, placed in an order shuffled by `rng` (None: the given order).
    Sequence j of the row (`where[j]`) is encs[j]: the prompt's positions, then its response's."""
    prompt, responses = split_prompt(encs)
    order = list(range(len(encs)))
    if rng is not None:
        rng.shuffle(order)
    row = Row(where=[[] for _ in encs])
    P = len(prompt)
    shared = row._add(list(prompt), list(range(P)), doc, 0, -1)
    for k, j in enumerate(order, start=1):
        r = responses[j]
        row.where[j] = shared + row._add(list(r), list(range(P, P + len(r))), doc, k, shared[-1] if shared else -1)
    return row


def join_rows(rows: list[Row]) -> Row:
    """Rows back to back in one row (their documents must have distinct ids): packed prefix-shared DPO pairs.
    The sequences of the result are the rows' sequences in order."""
    out = Row()
    for r in rows:
        off = len(out)
        out.ids += r.ids
        out.pos += r.pos
        out.doc += r.doc
        out.branch += r.branch
        out.prev += [p + off if p >= 0 else -1 for p in r.prev]
        out.where += [[t + off for t in w] for w in r.where]
    return out


def pack_rows(rows: list[Row], capacity: int) -> tuple[list[list[int]], list[Row]]:
    """Rows whose documents have distinct ids, joined first fit into rows of at most `capacity` tokens (0: left
    as they are): (the indices of the rows in each packed row, the packed rows). DPO's pairs, the reward model's
    one-rows."""
    bins = pack_greedy([len(r) for r in rows], capacity) if capacity else [[i] for i in range(len(rows))]
    return bins, [join_rows([rows[i] for i in b]) for b in bins]


def document_row(encs: list[Encoded]) -> Row:
    """Whole sequences back to back, each its own document, position ids restarting at 0 (packed SFT)."""
    row = Row()
    for d, e in enumerate(encs):
        row.where.append(row._add(list(e.input_ids), list(range(len(e))), d, 0, -1))
    return row


def pack_greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens, first fit in the given order (a sequence
    longer than `capacity` gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        b = next((b for b, r in enumerate(room) if n <= r), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    return bins


def collate_rows(rows: list[Row], pad_id: int, mask_dtype: torch.dtype | None = torch.float32, pad_to: int = 0,
                 flex: bool = False) -> dict:
    """Right-padded tensors of packed rows.

    input_ids, position_ids, prev_pos: [B, T] (pad: pad id, positions counting on from 0, prev -1);
    attention_mask: [B, 1, T, T] additive `mask_dtype`; with mask_dtype None there is none (documents:
    transformers builds their mask from the restarting position ids when attention_mask is None). With
    `flex`, no dense mask but the rule's inputs, doc and branch [B, T]: `block_mask` makes FlexAttention's
    mask from them on the device (a [B, 1, T, T] tensor is what flex exists to avoid)."""
    T = max(max(len(r) for r in rows), pad_to)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), PAD_DOC, dtype=torch.long)
    branch = torch.zeros((B, T), dtype=torch.long)
    prev = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.ids, dtype=torch.long)
        pos[b, :n] = torch.tensor(r.pos, dtype=torch.long)
        pos[b, n:] = torch.arange(T - n)  # restarting: a document of pads of its own
        doc[b, :n] = torch.tensor(r.doc, dtype=torch.long)
        branch[b, :n] = torch.tensor(r.branch, dtype=torch.long)
        prev[b, :n] = torch.tensor(r.prev, dtype=torch.long)
    out = {"input_ids": ids, "position_ids": pos, "prev_pos": prev}
    if flex:
        out["doc"], out["branch"] = doc, branch
    elif mask_dtype is not None:
        out["attention_mask"] = attention_mask(doc, branch, mask_dtype)
    return out


def mask_rule(doc: torch.Tensor, branch: torch.Tensor):
    """The module doc's rule as a FlexAttention mask_mod over doc and branch [B, T]: True = q may attend to k."""

    def mask_mod(b, h, q, k):
        real = doc[b, q] != PAD_DOC
        sees = (k <= q) & (doc[b, k] == doc[b, q]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        return (real & sees) | (~real & (q == k))  # a pad sees itself

    return mask_mod


BLOCK = 128  # FlexAttention's default block of query and key positions


def block_mask(doc: torch.Tensor, branch: torch.Tensor):
    """FlexAttention's BlockMask of packed rows (doc, branch [B, T] on the device): the same rule as
    `attention_mask`; blocks of 128 x 128 positions that nothing in them may attend are skipped, so a row of
    several documents costs the attention of its documents, not of the row. transformers passes a BlockMask
    to its flex_attention implementation untouched (the model set to attn_implementation flex_attention).

    The blocks are those of `create_block_mask` (tested equal), counted from segments rather than by
    evaluating the rule at every one of the B x T x T positions: with that evaluation eager, the reward model's
    one row gained 1.43x over separate rows on an H200, and 1.70x with this build; compiled, it paid a compile
    for new shapes and grad modes (80 s of warm-up on an H100, and the 8B LoRA reference pass did not finish
    its first batch in 400 s; README "Measured on GPUs").

    A segment is one (document, branch) of a row. Every query of segment s may see every earlier key of
    segment t, or none, as the rule says of (s, t): the [S, S] matrix `sees`. With `count` [B, n, S] the
    positions of each segment in each of the n blocks, count @ sees @ count^T [B, n, n] is the number of
    (query, key) pairs that may attend in each block pair wholly below the diagonal (every key before every
    query): 0, skipped; 128 x 128, full (pads are in no segment, so a block with a pad is never full); else
    partial, where the rule (mask_mod) runs per position. Diagonal blocks are partial (a query sees itself,
    never a later key), blocks above it empty."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc.shape
    n = -(-T // BLOCK)
    real = doc != PAD_DOC
    top_doc, top_branch = torch.stack([doc.max(), branch.max()]).tolist()  # one sync a micro-batch: the table's size
    n_br = top_branch + 1
    S = (top_doc + 1) * n_br
    seg = torch.where(real, doc * n_br + branch, S)  # [B, T]; pads (and, below, positions past T) -> column S
    seg = torch.nn.functional.pad(seg, (0, n * BLOCK - T), value=S).view(B, n, BLOCK)
    # float64: the counts (<= 128 * 128) stay exact whatever the matmul precision settings (TF32)
    count = torch.zeros(B, n, S + 1, dtype=torch.float64, device=doc.device)
    count = count.scatter_add_(-1, seg, torch.ones_like(seg, dtype=torch.float64))[..., :S]  # [B, n, S]
    s = torch.arange(S, device=doc.device)
    sd, sb = s // n_br, s % n_br  # each segment's document and branch
    sees = (sd[:, None] == sd[None, :]) & ((sb[None, :] == 0) | (sb[None, :] == sb[:, None]))  # [S_q, S_k]
    pairs = count @ sees.double() @ count.transpose(1, 2)  # [B, n_q, n_k]
    i = torch.arange(n, device=doc.device)
    below, diag = i[:, None] > i[None, :], i[:, None] == i[None, :]  # [n, n]
    full = below & (pairs == BLOCK * BLOCK)
    partial = diag | (below & (pairs > 0) & ~full)

    def ordered(dense):  # [B, n, n] bool -> the BlockMask's counts [B, 1, n] and indices [B, 1, n, n], int32
        dense = dense[:, None].to(torch.int32)
        idx = torch.argsort(dense, dim=-1, descending=True, stable=True)  # the kept blocks first, in order
        return dense.sum(-1).to(torch.int32), idx.to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_rule(doc, branch),
                                    seq_lengths=(T, T))


def flex_inputs(batch: dict) -> dict:
    """A collated batch (on its device) with its doc/branch replaced by the BlockMask (`collate_rows(flex=True)`)."""
    if "doc" not in batch:
        return batch
    batch = dict(batch)
    batch["attention_mask"] = block_mask(batch.pop("doc"), batch.pop("branch"))
    return batch


def attention_mask(doc: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [B, 1, T, T] from document ids and branches [B, T] (the rule in the module's doc)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, T]
    dq, dk = doc[:, :, None], doc[:, None, :]  # [B, T, 1], [B, 1, T]
    bq, bk = branch[:, :, None], branch[:, None, :]
    allowed = causal & (dq == dk) & ((bk == 0) | (bk == bq)) & (dq != PAD_DOC)  # [B, T, T]
    allowed |= torch.eye(T, dtype=torch.bool) & (dq == PAD_DOC)  # a pad sees itself
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def place(rows: list[Row], values: list[list[list[int] | None]], T: int) -> torch.Tensor:
    """Per-token values of the rows' sequences at their row positions: values[b][j] is a list as long as
    sequence j of row b (None: leave 0). -> [B, T] long. A shared prompt position takes the value of the
    last sequence given for it (masks of a prompt are 0 in every sequence). A token that nothing predicts
    (a sequence's first) gets 0: it never counts."""
    out = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (r, per_seq) in enumerate(zip(rows, values)):
        for j, v in enumerate(per_seq):
            if v is not None:
                out[b, r.where[j]] = torch.tensor(v, dtype=torch.long)
        out[b, [t for t, p in enumerate(r.prev) if p < 0]] = 0
    return out
