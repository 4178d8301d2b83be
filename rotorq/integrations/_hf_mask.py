"""Which cached positions hold real tokens: the padding of each sequence, read from the
4D attention masks that transformers builds, for
:class:`rotorq.integrations.transformers.RotorqCache`.

The compressed layers store each sequence's real tokens only (a left-padded prompt's pads
are skipped), so token ``i`` of a sequence's cache is that sequence's ``i``-th real token,
and attention on the codes needs no mask. What a mask may say is therefore limited to
causal attention over real tokens; any other mask (bidirectional blocks, custom patterns)
is refused rather than ignored.
"""

from __future__ import annotations

import torch


def allowed(mask):
    """Boolean ``(batch, q, kv)`` view of a 4D mask: True where a query may attend a key
    (boolean masks as they are; additive float masks: entries above half the dtype's
    minimum)."""
    if mask.ndim != 4:
        raise ValueError(f"expected a 4D attention mask (batch, heads, q, kv), got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        raise NotImplementedError("per-head attention masks are not supported by RotorqCache")
    return mask[:, 0]


class RealTokens:
    """Padding history of the cached sequences, shared by every compressed layer.

    ``flags(mask, batch, past, q)`` returns which of the ``q`` new tokens of each sequence
    are real (``numpy`` bool ``(batch, q)``), checks that the mask is causal attention
    over real tokens, and extends the history; the result is kept for the mask object it
    came from, so the layers of one forward pass read and check a mask once (one device
    synchronization per forward pass on a GPU, none when the mask is None).
    """

    def __init__(self):
        self.real = None  # torch bool (batch, positions), on the masks' device
        self._memo = None

    def reset(self):
        self.real = None
        self._memo = None

    def select(self, index):
        """Keep the sequences ``index`` (a list of ints) in that order."""
        if self.real is not None:
            self.real = self.real[torch.as_tensor(index, device=self.real.device)]
        self._memo = None

    def flags(self, mask, batch, past, q):
        memo = self._memo
        if memo is not None and memo[0] is mask and memo[1:4] == (batch, past, q):
            return memo[4]
        device = mask.device if mask is not None else None
        if mask is None:
            new = torch.ones((batch, q), dtype=torch.bool)
        else:
            a = allowed(mask)
            if a.shape[-2] != q or a.shape[-1] != past + q:
                raise ValueError(f"the attention mask covers {a.shape[-2]} queries x "
                                 f"{a.shape[-1]} keys, but this forward pass has {q} new tokens "
                                 f"after {past} cached positions")
            if a.shape[0] not in (1, batch):
                raise ValueError(f"the attention mask has batch size {a.shape[0]}, the keys {batch}")
            a = a.expand(batch, q, past + q)
            steps = torch.arange(q, device=device)
            new = a[:, steps, past + steps]
            history = self._history(batch, past, device)
            causal = torch.ones((q, q), dtype=torch.bool, device=device).tril()
            expected = torch.cat([history[:, None, :].expand(batch, q, past),
                                  new[:, None, :] & causal], dim=2)
            # rows of padded queries are free: their outputs are never read
            ok = ((a == expected) | ~new[:, :, None]).all()
            new, ok = new.cpu(), bool(ok)
            if not ok:
                raise NotImplementedError(
                    "the attention mask of this forward pass is not causal attention over the "
                    "non-padded tokens (a bidirectional block, a custom mask or a changed "
                    "padding); RotorqCache attends every real cached token of a sequence")
        self._extend(new, batch, past, device)
        out = new.numpy()
        self._memo = (mask, batch, past, q, out)
        return out

    def _history(self, batch, past, device):
        real = self.real
        if real is None:
            real = torch.ones((batch, 0), dtype=torch.bool, device=device)
        real = real.to(device)
        if real.shape[1] < past:  # positions never described by a mask were all real
            real = torch.cat([real, torch.ones((batch, past - real.shape[1]), dtype=torch.bool,
                                               device=device)], dim=1)
        return real[:, :past]

    def _extend(self, new, batch, past, device):
        device = device if device is not None else (
            self.real.device if self.real is not None else torch.device("cpu"))
        self.real = torch.cat([self._history(batch, past, device), new.to(device)], dim=1)
