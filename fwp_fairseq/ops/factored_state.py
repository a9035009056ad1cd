"""The fast weight of one attention layer while decoding, kept as its factors while they are smaller.

S = K^T U (B, H, d_dot, Dv) is the sum of what was written, one k_i u_i^T per step:
- sum rule and non-causal (encoder-decoder) attention: u_i = v_i;
- delta rule: u_t = beta_t (v_t - S_{t-1}^T k_t), so that S_t = S_{t-1} + k_t u_t^T exactly.
While t (d_dot + Dv) < d_dot Dv (plan.keep_factored) the factors K (t x d_dot) and U
(t x Dv) are stored and read as o = U^T (K q); past that they are folded once into S, so the memory
stays bounded by S's size. z (B, H, 1, d_dot), the attention normaliser's running sum of keys, is
carried along.

A FactoredState round-trips through fairseq's incremental-state buffer (a dict of tensors with
the batch first, which beam search reorders with index_select): to_buffer / from_buffer."""
from typing import Dict, Optional

import torch

from ._checks import _tensor, accumulation_dtype
from .plan import keep_factored
from .noncausal import masked_keys

BUFFER_KEYS = ("fw_keys", "fw_values", "fw_state", "fw_z")


class FactoredState:
    """One layer's fast weight while decoding, S = K^T U, kept as its factors while smaller.

    Args:
        keys: K (B, H, t, d_dot) and values: U (B, H, t, Dv), the t writes so far; or
        matrix: S (B, H, d_dot, Dv) once folded (never both forms).
        z: (B, H, 1, d_dot), the attention normaliser's running sum of keys, or None.
        All in the accumulation dtype (fp32 for half inputs, as the ops keep their state).
    Example:
        >>> s = FactoredState()
        >>> for t in range(3):  # the delta rule, one step at a time
        ...     s = s.append(torch.rand(2, 4, 1, 16), torch.randn(2, 4, 1, 32), beta=torch.rand(2, 4, 1))
        >>> o = s.read(torch.rand(2, 4, 1, 16))  # (2, 4, 1, 32); s.steps == 3 while factored
    """

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                 matrix: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None):
        if (keys is None) != (values is None):
            raise ValueError("keys, values: give both factors or neither")
        if keys is not None and matrix is not None:
            raise ValueError("matrix: a state is either factored (keys, values) or a matrix, not both")
        self.keys, self.values, self.matrix, self.z = keys, values, matrix, z

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def written(cls, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                with_z: bool = False, fold: str = "auto") -> "FactoredState":
        """The state after writing every unpadded key at once (encoder-decoder attention),
        factored or a matrix by keep_factored(Tk, ...). z = the sum of the keys when with_z."""
        _tensor("k", k, 4)
        _tensor("v", v, 4)
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v: expected shape (B, H, T, Dv) matching k {tuple(k.shape)}, got {tuple(v.shape)}")
        ka = masked_keys(k, key_padding_mask)
        z = ka.sum(2, keepdim=True) if with_z else None
        state = cls(ka, v.to(ka.dtype), z=z)
        return state._maybe_fold(fold)

    @classmethod
    def from_buffer(cls, buffer: Optional[Dict[str, torch.Tensor]]) -> Optional["FactoredState"]:
        """The state stored by to_buffer, or None when the buffer holds none (before step one)."""
        if not buffer:
            return None
        keys, values, matrix, z = (buffer.get(name) for name in BUFFER_KEYS)
        if keys is None and matrix is None:
            return None
        return cls(keys, values, matrix, z)

    def to_buffer(self) -> Dict[str, torch.Tensor]:
        """A dict for fairseq's incremental state: the tensors held, each batch-first."""
        held = zip(BUFFER_KEYS, (self.keys, self.values, self.matrix, self.z))
        return {name: x for name, x in held if x is not None}

    # -- queries ----------------------------------------------------------------------------
    @property
    def empty(self):
        return self.keys is None and self.matrix is None

    @property
    def factored(self):
        return self.keys is not None

    @property
    def steps(self):
        """How many writes the factors hold (None once folded into the matrix)."""
        return self.keys.shape[2] if self.factored else None

    def _dims(self):
        if self.factored:
            return self.keys.shape[-1], self.values.shape[-1]
        return self.matrix.shape[-2], self.matrix.shape[-1]

    def _check_query(self, name, x):
        _tensor(name, x, 4)
        ref = self.keys if self.factored else self.matrix
        if x.shape[:2] != ref.shape[:2] or x.shape[-1] != self._dims()[0]:
            raise ValueError(f"{name}: expected ({ref.shape[0]}, {ref.shape[1]}, T, {self._dims()[0]}), "
                             f"got {tuple(x.shape)}")

    def _apply(self, qa):
        """S^T q for q (B, H, Tq, d_dot) in the accumulation dtype."""
        if self.factored:
            return (qa @ self.keys.transpose(-1, -2)) @ self.values
        return qa @ self.matrix

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """o = S^T q for every query: (B, H, Tq, Dv) in q's dtype; zeros from an empty state
        cannot be formed (Dv unknown), so read after the first write."""
        if self.empty:
            raise ValueError("read: the state is empty; append a step first")
        self._check_query("q", q)
        acc = (self.keys if self.factored else self.matrix).dtype
        return self._apply(q.to(acc)).to(q.dtype)

    # -- updates ----------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, beta: Optional[torch.Tensor] = None,
               z_key: Optional[torch.Tensor] = None, fold: str = "auto") -> "FactoredState":
        """Write one step: k (B, H, 1, d_dot), v (B, H, 1, Dv), beta (B, H, 1) for the delta rule.
        z_key: what the normaliser z adds (the unscaled phi(k) when the caller rescaled k); z is
        left alone when None. fold: "auto" (keep_factored decides), "never" (tests) or "now"."""
        _tensor("k", k, 4)
        _tensor("v", v, 4)
        if k.shape[2] != 1 or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"k, v: expected one step, (B, H, 1, d_dot) and (B, H, 1, Dv), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if not self.empty:
            self._check_query("k", k)
            if v.shape[-1] != self._dims()[1]:
                raise ValueError(f"v: expected {self._dims()[1]} value features (as written before), "
                                 f"got {v.shape[-1]}")
        acc = accumulation_dtype(k.dtype)
        ka, u = k.to(acc), v.to(acc)
        if beta is not None:
            if tuple(beta.shape) != tuple(k.shape[:3]):
                raise ValueError(f"beta: expected shape {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
            if not self.empty:
                u = u - self._apply(ka)  # v_t - S_{t-1}^T k_t
            u = u * beta.to(acc)[..., None]
        if z_key is not None:
            zk = z_key.to(acc)
            self.z = zk if self.z is None else self.z + zk
        if self.empty:
            self.keys, self.values = ka, u
        elif self.factored:
            self.keys = torch.cat([self.keys, ka], dim=2)
            self.values = torch.cat([self.values, u], dim=2)
        else:
            self.matrix = self.matrix + ka.transpose(-1, -2) @ u
        return self._maybe_fold(fold)

    def fold(self) -> "FactoredState":
        """Replace the factors by S = K^T U (costs t d_dot Dv once)."""
        if self.factored:
            self.matrix = self.keys.transpose(-1, -2) @ self.values
            self.keys = self.values = None
        return self

    def _maybe_fold(self, fold):
        if fold not in ("auto", "never", "now"):
            raise ValueError(f"fold: expected 'auto', 'never' or 'now', got {fold!r}")
        if self.factored and (fold == "now" or (fold == "auto" and not keep_factored(self.steps, *self._dims()))):
            self.fold()
        return self

    def as_matrix(self) -> torch.Tensor:
        """S (B, H, d_dot, Dv), without changing the stored form."""
        if self.empty:
            raise ValueError("as_matrix: the state is empty")
        return self.keys.transpose(-1, -2) @ self.values if self.factored else self.matrix

    def index_select(self, order: torch.Tensor) -> "FactoredState":
        """A state with the batch rows `order` (beam search), every tensor alike."""
        pick = (lambda x: None if x is None else x.index_select(0, order))
        return FactoredState(pick(self.keys), pick(self.values), pick(self.matrix), pick(self.z))
