"""Cron expressions to fire times, and the heap of due jobs.

A job's schedule is seven cron fields, ``sec min hour dom mon dow year``, matched by the
``crontab`` package (every field must match; ``dow`` 0 and 7 are Sunday). Fire times are
whole seconds, returned as aware UTC datetimes.

Time zones and daylight saving time (the one rule)
--------------------------------------------------
A job with ``utc: true`` is matched against UTC wall-clock time, which has no DST.
Every other job is matched against the *naive local wall-clock time* of the daemon's zone
(``local_zone()``), and each matching wall-clock time becomes an instant like this:

1. A wall-clock time that does not exist (spring forward) is shifted forward by the gap:
   it is read with the offset in force before the transition (zoneinfo ``fold=0``), so in
   Europe/Berlin 02:30 on the spring-forward day becomes 03:30 CEST.
2. A wall-clock time that occurs twice (fall back) fires once, at its first occurrence
   (``fold=0``: the summer-time reading).
3. An instant that is not later than the instant the search started from (for a job, its
   previous fire time) is never returned, so nothing fires twice and fire times of a job
   strictly increase. This is what drops, for example, wall-clock 03:00..03:59 on the
   spring-forward day for an every-minute job: 02:00..02:59 already fired at those instants.

So a daily 02:30 job fires once on both transition days (03:30 CEST in spring, the first
02:30 in autumn), and an every-minute job fires exactly once per real minute across both.
"""

import functools
import heapq
import logging
import os
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Callable, Dict, List, Optional, Tuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from crontab import CronTab

log = logging.getLogger(__name__)

# Field names in the order CronTab expects them.
CRON_FIELDS = ("sec", "min", "hour", "dom", "mon", "dow", "year")
_LOCALTIME = "/etc/localtime"
# Fleets share a few schedules ("0 * * * *"), and the crontab search costs up to a
# millisecond, so equal (schedule, after, zone) questions are answered once.
_NEXT_AFTER_CACHE_SIZE = 4096
# next_after() is strictly-after on whole seconds; asking from just before a moment gives
# the first fire time at or after it.
_JUST_BEFORE = timedelta(microseconds=1)
_ZONEINFO_MARKER = "zoneinfo/"


class ScheduleError(ValueError):
    """A cron expression that cannot be used; the message names the field when it can."""


def _as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive ``moment`` is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class CronSchedule:
    """One job's cron expression, validated at construction.

    Raises ``ScheduleError`` naming the offending field if any field is not valid cron
    syntax for its position.
    """

    __slots__ = ("fields", "utc", "_crontab")

    def __init__(self, sec="0", min="*", hour="*", dom="*", mon="*", dow="*", year="*",
                 utc: bool = False):
        values = (sec, min, hour, dom, mon, dow, year)
        self.fields: Tuple[str, ...] = tuple(_field_text(name, value)
                                             for name, value in zip(CRON_FIELDS, values))
        self.utc = bool(utc)
        # Each field is checked alone first so that the error can name it; the whole
        # expression is then built once and kept.
        for index, name in enumerate(CRON_FIELDS):
            probe = ["0", "*", "*", "*", "*", "*", "*"]
            probe[index] = self.fields[index]
            try:
                CronTab(" ".join(probe))
            except Exception as exc:  # crontab raises ValueError, or worse on odd input
                raise ScheduleError("field %r: invalid cron expression %r: %s"
                                    % (name, self.fields[index], exc)) from None
        try:
            self._crontab = CronTab(" ".join(self.fields))
        except Exception as exc:
            raise ScheduleError("invalid cron expression %r: %s"
                                % (" ".join(self.fields), exc)) from None

    @classmethod
    def from_job(cls, job) -> "CronSchedule":
        """The schedule of anything with the seven cron attributes and ``utc`` (a ``Job``)."""
        return cls(job.sec, job.min, job.hour, job.dom, job.mon, job.dow, job.year,
                   utc=job.utc)

    def __repr__(self):
        return "CronSchedule(%r%s)" % (" ".join(self.fields), ", utc" if self.utc else "")

    def __eq__(self, other):
        return (isinstance(other, CronSchedule) and self.fields == other.fields
                and self.utc == other.utc)

    def __hash__(self):
        return hash((self.fields, self.utc))

    def _next_wall_clock(self, wall_clock: datetime) -> Optional[datetime]:
        """The next naive wall-clock time strictly after ``wall_clock`` that matches."""
        return self._crontab.next(wall_clock, return_datetime=True, default_utc=True)

    def next_after(self, after: datetime, tz: tzinfo) -> Optional[datetime]:
        """The first fire time strictly after ``after``, as an aware UTC datetime.

        ``after`` may be aware (any zone) or naive (taken as UTC). ``tz`` is the zone of
        local wall-clock time; it is ignored for ``utc`` schedules. Returns None when the
        expression never matches again (a year in the past, 30 February...). The DST rule
        is in the module docstring.
        """
        return _cached_next_after(self, _as_utc(after), tz)

    def _search_next_after(self, after_utc: datetime, tz: tzinfo) -> Optional[datetime]:
        if self.utc:
            found = self._next_wall_clock(after_utc.replace(tzinfo=None))
            return None if found is None else found.replace(tzinfo=timezone.utc)

        search_from = after_utc.astimezone(tz).replace(tzinfo=None)
        after_wall_clock = search_from
        while True:
            wall_clock = self._next_wall_clock(search_from)
            if wall_clock is None:
                return None
            # fold=0 is the default of replace(): gaps read with the pre-transition offset
            # (shifted forward), repeated times read as their first occurrence.
            instant = wall_clock.replace(tzinfo=tz).astimezone(timezone.utc)
            if instant > after_utc:
                return instant
            # Not later than where we started (rule 3). Resume from whichever is later:
            # this candidate, or the wall clock of `after`, which skips the wall-clock
            # times just past a spring-forward gap in one step.
            search_from = max(wall_clock, after_wall_clock)


@functools.lru_cache(maxsize=_NEXT_AFTER_CACHE_SIZE)
def _cached_next_after(cron_schedule: CronSchedule, after_utc: datetime,
                       tz: tzinfo) -> Optional[datetime]:
    return cron_schedule._search_next_after(after_utc, tz)


def _field_text(name: str, value) -> str:
    """A cron field as text; ints are accepted, booleans and empty text are not."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ScheduleError("field %r: expected a cron expression, got %r" % (name, value))
    text = str(value).strip()
    if not text or len(text.split()) != 1:
        raise ScheduleError("field %r: expected one cron expression without spaces, got %r"
                            % (name, value))
    return text


def local_zone() -> tzinfo:
    """The daemon's local time zone, with its DST rules.

    From ``TZ`` (a zone name, optionally ``:``-prefixed, or a path to a tzfile), else from
    ``/etc/localtime``. Falls back to UTC with a warning when neither can be read.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            if name.startswith("/"):
                with open(name, "rb") as tzfile:
                    return ZoneInfo.from_file(tzfile, key=name)
            return ZoneInfo(name)
        except (OSError, ValueError, ZoneInfoNotFoundError) as exc:
            log.warning("schedule: TZ=%r is not a usable time zone (%s); trying %s",
                        name, exc, _LOCALTIME)
    try:
        target = os.path.realpath(_LOCALTIME)
        if _ZONEINFO_MARKER in target:
            key = target.split(_ZONEINFO_MARKER, 1)[1]
            try:
                return ZoneInfo(key)
            except (ValueError, ZoneInfoNotFoundError):
                pass  # not a known key: read the file itself below
        with open(_LOCALTIME, "rb") as tzfile:
            return ZoneInfo.from_file(tzfile, key="localtime")
    except (OSError, ValueError) as exc:
        log.warning("schedule: cannot read the local time zone from %s (%s); "
                    "scheduling local-time jobs in UTC", _LOCALTIME, exc)
    return timezone.utc


class DueQueue:
    """Next fire time of every scheduled job, in a heap; idle while nothing is due.

    Entries are ``(fire_time, job_name, generation)``. Replacing or removing a job bumps
    its generation, which turns its old heap entry stale; stale entries are dropped when
    they reach the top, and the heap is rebuilt when they outnumber the live ones.
    """

    def __init__(self):
        self._heap: List[Tuple[datetime, str, int]] = []
        # job_name -> (generation, fire_time, schedule, tz) of its one live entry.
        self._live: Dict[str, Tuple[int, datetime, CronSchedule, tzinfo]] = {}
        self._generation = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_name: str) -> bool:
        return job_name in self._live

    def schedule(self, job_name: str, cron_schedule: CronSchedule, tz: tzinfo,
                 now: datetime) -> Optional[datetime]:
        """Add ``job_name``, or replace its schedule, with its first fire time after ``now``.

        Returns that fire time, or None if the schedule never fires again (the job is then
        not queued).
        """
        self.remove(job_name)
        fire_time = cron_schedule.next_after(now, tz)
        if fire_time is not None:
            self._push(job_name, fire_time, cron_schedule, tz)
        return fire_time

    def remove(self, job_name: str) -> None:
        """Forget ``job_name``; a job that is not queued is ignored."""
        if self._live.pop(job_name, None) is not None:
            self._compact_if_mostly_stale()

    def peek(self, job_name: str) -> Optional[datetime]:
        """The next fire time of ``job_name``, or None if it is not queued."""
        entry = self._live.get(job_name)
        return None if entry is None else entry[1]

    def next_fire_time(self) -> Optional[datetime]:
        """The earliest fire time of any queued job, or None if the queue is empty."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def due_before(self, moment: datetime, limit: Optional[int] = None,
                   include: Optional[Callable[[str], bool]] = None) -> List[str]:
        """The queued jobs that fire at or before ``moment`` (each named once), at most
        ``limit`` of them; with ``include``, only the jobs for whose name it returns True.

        Walks only the part of the heap that is due by then: a heap entry later than
        ``moment`` has no earlier entry below it, so the cost is the number of entries due
        (stale ones included), at most ``limit`` listed ones.
        """
        moment_utc = _as_utc(moment)
        heap = self._heap
        names: List[str] = []
        todo = [0] if heap else []
        while todo and (limit is None or len(names) < limit):
            index = todo.pop()
            entry = heap[index]
            if entry[0] > moment_utc:
                continue
            if self._is_live(entry) and (include is None or include(entry[1])):
                names.append(entry[1])
            todo.extend(child for child in (2 * index + 1, 2 * index + 2)
                        if child < len(heap))
        return names

    def pop_due(self, now: datetime,
                max_lateness: Optional[float] = None) -> List[Tuple[str, datetime]]:
        """Every ``(job_name, fire_time)`` with ``fire_time <= now``, in time order.

        Each due fire time is returned exactly once, and its job is queued again from that
        fire time (not from ``now``), so a loop that woke up late still sees every fire
        time it slept through, none skipped and none doubled.

        With ``max_lateness`` (seconds), fire times older than ``now - max_lateness`` are
        dropped with a warning instead (after a suspend or a clock jump, an every-second
        job would otherwise fire once per second missed); the job resumes after that cutoff.
        """
        now_utc = _as_utc(now)
        cutoff = None if max_lateness is None else now_utc - timedelta(seconds=max_lateness)
        due: List[Tuple[str, datetime]] = []
        while True:
            self._drop_stale_top()
            if not self._heap or self._heap[0][0] > now_utc:
                return due
            fire_time, job_name, _generation = heapq.heappop(self._heap)
            _generation, _fire_time, cron_schedule, tz = self._live.pop(job_name)
            if cutoff is not None and fire_time < cutoff:
                log.warning("schedule: job %s: dropping fire times from %s to %s, more than "
                            "%s s late", job_name, fire_time, cutoff, max_lateness)
                following = cron_schedule.next_after(cutoff - _JUST_BEFORE, tz)
            else:
                due.append((job_name, fire_time))
                following = cron_schedule.next_after(fire_time, tz)
            if following is not None:
                self._push(job_name, following, cron_schedule, tz)

    def _push(self, job_name, fire_time, cron_schedule, tz):
        self._generation += 1
        self._live[job_name] = (self._generation, fire_time, cron_schedule, tz)
        heapq.heappush(self._heap, (fire_time, job_name, self._generation))

    def _is_live(self, entry) -> bool:
        _fire_time, job_name, generation = entry
        live = self._live.get(job_name)
        return live is not None and live[0] == generation

    def _drop_stale_top(self):
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)

    def _compact_if_mostly_stale(self):
        # Keeps memory bounded when jobs are replaced over and over (config reloads).
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if self._is_live(entry)]
            heapq.heapify(self._heap)
