"""The state protocol every accumulator shares: ``state_dict`` / ``load_state_dict`` of float64 tensors, and
the exact merge of summed states."""

from __future__ import annotations

from typing import Self

import torch


class _State:
    """An accumulator whose state is the tensors ``STATE`` names: moved between processes with :meth:`state_dict`
    and :meth:`load_state_dict` (then merged by the accumulator's own ``merge``)."""

    STATE: tuple[str, ...] = ()
    device: torch.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated state as CPU tensors (to send to another process and :meth:`load_state_dict` there)."""
        return {name: getattr(self, name).detach().cpu() for name in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Self:
        """Replace this state by ``state`` (from :meth:`state_dict` of an accumulator of the same shape)."""
        for name in self.STATE:
            value = state[name].to(self.device)
            if value.shape != getattr(self, name).shape:
                raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(getattr(self, name).shape)}")
            setattr(self, name, value.to(getattr(self, name).dtype).clone())
        return self


class _Sums(_State):
    """State made only of sums: merged exactly by adding (the other state must come from the same constants)."""

    @torch.no_grad()
    def merge(self, other: Self) -> Self:
        """Add ``other``'s sums to this state and return ``self``."""
        for name in self.STATE:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self
