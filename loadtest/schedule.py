"""Step load schedule: 1, 2, 4, ... concurrent users, each level held for a bounded stage, under
a hard total time limit. (The Locust shape that follows it, StepLoadShape, is in locustfile.py:
importing locust monkey-patches the process with gevent, which only Locust processes may do;
this module is also used by the runner, the report and the tests.)

A closed-loop user sends its next request only after the previous one was answered, so the user
count is the number of requests in flight: stepping it is stepping concurrency, which is what
`minWorkers`/`maxWorkers`/`job_queue_size` are sized against. The schedule is a plain value
(`StepSchedule`) so the report computes stage windows from the very same object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSchedule:
    users: tuple[int, ...]  # concurrency of each stage, in order
    stage_s: float  # length of every stage
    max_s: float  # hard limit on the whole run, whatever the stages add up to

    def __post_init__(self) -> None:
        if not self.users or any(u < 1 for u in self.users):
            raise ValueError(f"stages must be positive user counts, got {self.users}")
        if self.stage_s <= 0 or self.max_s <= 0:
            raise ValueError("stage and total lengths must be positive")

    @classmethod
    def parse(cls, users: str, stage_s: float, max_s: float) -> "StepSchedule":
        """`users` as on the command line: "1,2,4"."""
        return cls(tuple(int(part) for part in users.split(",") if part.strip()), stage_s, max_s)

    @property
    def duration_s(self) -> float:
        return min(self.stage_s * len(self.users), self.max_s)

    def users_at(self, elapsed_s: float) -> int | None:
        """Concurrency at `elapsed_s` seconds into the run; None once the run is over."""
        if elapsed_s >= self.duration_s:
            return None
        return self.users[min(int(elapsed_s // self.stage_s), len(self.users) - 1)]

    def windows(self) -> list[tuple[int, float, float]]:
        """(users, start_s, end_s) of every stage that starts before the hard limit."""
        result = []
        for index, users in enumerate(self.users):
            start = index * self.stage_s
            if start >= self.duration_s:
                break
            result.append((users, start, min(start + self.stage_s, self.duration_s)))
        return result

    def to_dict(self) -> dict:
        return {"users": list(self.users), "stage_s": self.stage_s, "max_s": self.max_s}

