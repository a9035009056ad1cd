"""Fast weights carried from one segment to the next (task fwp_stream_lm --fwp-carry-state).

One CarriedState per causal attention layer maps a slot, "train" or "eval" (validation in the
middle of an epoch is another set of streams), to the (S, z) its last segment ended with.
Row b of every batch is stream b: another batch size means other streams."""


class CarriedState(dict):
    """slot -> (S (B, H, d_dot, Dv), z (B, H, 1, d_dot) or None); a missing slot is W = 0, z = 0."""

    def load(self, slot, bsz):
        """(S, z) to continue from, (None, None) after a reset."""
        carried = self.get(slot)
        if carried is None:
            return None, None
        if carried[0].size(0) != bsz:
            raise RuntimeError(
                f"--fwp-carry-state: the carried fast weights hold {carried[0].size(0)} streams but "
                f"this batch has {bsz} rows; reset the state (model.reset_fast_weights()) when "
                "starting new streams")
        return carried

    def store(self, slot, state, z):
        """Detached: backpropagation stays within the segment (truncated BPTT)."""
        self[slot] = (state.detach(), None if z is None else z.detach())

    def reset(self, slot=None):
        """Forget `slot` ("train" / "eval"), or both."""
        if slot is None:
            self.clear()
        else:
            self.pop(slot, None)

    def reset_rows(self, rows, slot):
        """Forget some streams of `slot` only: rows is a (B,) bool mask."""
        carried = self.get(slot)
        if carried is None or not bool(rows.any()):
            return
        state, z = carried
        keep = (~rows).to(device=state.device, dtype=state.dtype).view(-1, *[1] * (state.dim() - 1))
        self[slot] = (state * keep, None if z is None else z * keep)


class CarriesState:
    """The carried-state switches of FastWeightAttention (which sets self.causal, self._carried
    and self.carry_state = False in its constructor)."""

    def _carried_states(self):
        """Every CarriedState the layer keeps (the layer may add others beside its (S, z))."""
        return (self._carried,)

    def set_carry_state(self, on=True):
        """Carry (S, z) from one forward to the next when no incremental_state is given: the
        batch rows must be contiguous streams whose consecutive segments arrive in order."""
        if on and not self.causal:
            raise ValueError("carry_state: only causal self-attention has a state to carry")
        self.carry_state = bool(on)
        for carried in self._carried_states():
            carried.reset()

    def reset_carried_state(self, slot=None):
        """Forget the carried state of `slot` ("train" / "eval"), or of both: W = 0, z = 0."""
        for carried in self._carried_states():
            carried.reset(slot)

    def reset_carried_rows(self, rows, slot="train"):
        """Forget the carried state of some streams only: rows is a (B,) bool mask."""
        for carried in self._carried_states():
            carried.reset_rows(rows, slot)

    def _carry_slot(self):
        return "train" if self.training else "eval"
