"""A training DataLoader that resumes mid-epoch exactly: a run killed and resumed from its last checkpoint
sees the same batches, in the same order, as a run that was never interrupted.

Lightning saves the ``state_dict`` of any training dataloader that has one in its checkpoints and hands it back
to ``load_state_dict`` on resume, before the epoch's iterator is created. The order of each epoch depends only
on (seed, epoch) -- ``DistributedSampler`` semantics, which Lightning also leaves in place under DDP/FSDP/DeepSpeed
instead of injecting its own sampler -- so the resumed run only has to skip what this rank already trained on.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled by (seed, epoch) and split across ranks like ``DistributedSampler``; after ``resume_from`` the
    first iteration of that epoch skips the samples already trained on."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)

    def resume_from(self, epoch: int, samples_done: int) -> None:
        self._resume = (epoch, samples_done)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None  # one-shot: later epochs start from their beginning
            if epoch == self.epoch:
                indices = indices[skip:]
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` whose position Lightning stores in checkpoints.

    ``batches_done`` reports how many batches of the current epoch the trainer has finished; it is read from the
    trainer's progress rather than counted here because workers and prefetching fetch batches before they train.
    """

    def __init__(self, dataset, *, sampler: ResumableSampler, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._batches_done()), "batch_size": self.batch_size,
                "seed": self.sampler.seed, "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("num_replicas"), state.get("batch_size")) != (
            self.sampler.seed, self.sampler.num_replicas, self.batch_size
        ):
            # Another seed, batch size or world size reorders the data: the saved position means nothing here.
            rank_zero_warn("the checkpoint's data order (seed, batch size or world size) differs from this run's: "
                           "the resumed epoch starts from its beginning")
            return
        self.sampler.resume_from(int(state["epoch"]), int(state["batches_done"]) * self.batch_size)
