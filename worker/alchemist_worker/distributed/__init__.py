"""Data-parallel continual learning: every replica of a job trains one model together over torch.distributed.

- `settings.py`: whether a replica trains in the group, and its timeouts;
- `communicator.py`: one generation's process group (gloo on CPU, NCCL on GPU) over torch's TCPStore, which
  the leader hosts;
- `trainer.py`: the local half of a round (the gradient of this replica's samples, in slices) and the
  identical optimizer step every member applies to the all-reduced gradient;
- `rounds.py`: the communication thread: membership, generations and synchronous rounds;
- `round_commit.py`: the version a round becomes (one publisher, every member's feedback in it);
- `control.py`: the control thread in data-parallel mode (feedback goes to the replica that served it).
Membership lives in Redis (alchemist_protocol.training_group); the trainer lease picks the leader.
"""
