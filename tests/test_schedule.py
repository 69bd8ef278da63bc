"""Cron schedules, the DST rule and the due-time heap, on a controlled clock."""

import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from saltpeter import schedule as schedule_module
from saltpeter.schedule import CronSchedule, DueQueue, ScheduleError, local_zone

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def fire_times(cron, start, count, tz):
    """The next ``count`` fire times of ``cron`` after ``start``, each from the previous."""
    times, after = [], start
    for _ in range(count):
        after = cron.next_after(after, tz)
        times.append(after)
    return times


def every_second():
    return CronSchedule("*", "*", "*", "*", "*", "*", "*")


# --- CronSchedule ------------------------------------------------------------------------

def test_next_after_is_strictly_later_whole_second_aware_utc():
    cron = CronSchedule("0", "*/5", "*", "*", "*", "*")
    assert cron.next_after(utc(2024, 5, 1, 10, 5, 0), UTC) == utc(2024, 5, 1, 10, 10, 0)
    found = cron.next_after(utc(2024, 5, 1, 10, 7, 13, 500), UTC)
    assert found == utc(2024, 5, 1, 10, 10, 0)
    assert found.tzinfo is UTC and found.microsecond == 0


def test_seconds_and_year_fields():
    cron = CronSchedule("15,45", "*", "*", "*", "*", "*", "2030")
    assert cron.next_after(utc(2024, 1, 1), UTC) == utc(2030, 1, 1, 0, 0, 15)
    assert fire_times(cron, utc(2030, 1, 1), 3, UTC) == [
        utc(2030, 1, 1, 0, 0, 15), utc(2030, 1, 1, 0, 0, 45), utc(2030, 1, 1, 0, 1, 15)]


def test_ints_are_accepted_and_normalised():
    cron = CronSchedule(0, 30, 2, "*", "*", "1-5")
    assert cron.fields == ("0", "30", "2", "*", "*", "1-5", "*")
    assert cron == CronSchedule("0", "30", "2", "*", "*", "1-5", "*")


def test_dow_names_and_sunday_as_7():
    sunday = CronSchedule("0", "0", "12", "*", "*", "7")
    assert sunday.next_after(utc(2024, 5, 1), UTC) == utc(2024, 5, 5, 12)  # a Sunday
    weekdays = CronSchedule("0", "0", "12", "*", "*", "mon-fri")
    assert weekdays.next_after(utc(2024, 5, 4), UTC) == utc(2024, 5, 6, 12)  # Sat -> Mon


def test_no_next_fire_time_returns_none():
    assert CronSchedule(year="2001").next_after(utc(2024, 1, 1), UTC) is None
    assert CronSchedule(dom="30", mon="2").next_after(utc(2024, 1, 1), UTC) is None


@pytest.mark.parametrize("field, value", [
    ("min", "61"), ("hour", "24"), ("dom", "0"), ("mon", "13"), ("dow", "8"),
    ("sec", "*/x"), ("year", "1900"), ("min", "5-1"), ("hour", "a"), ("min", ""),
    ("min", "1 2"), ("dow", True), ("hour", 1.5), ("min", None),
])
def test_invalid_expression_names_the_field(field, value):
    with pytest.raises(ScheduleError) as error:
        CronSchedule(**{field: value})
    assert "field %r" % field in str(error.value)


def test_naive_after_is_taken_as_utc():
    cron = CronSchedule("0", "0", "*", "*", "*", "*")
    assert cron.next_after(datetime(2024, 1, 1, 10, 30), UTC) == utc(2024, 1, 1, 11)


def test_from_job_reads_the_job_fields():
    class FakeJob:
        sec, min, hour, dom, mon, dow, year, utc = "0", "30", "2", "*", "*", "*", "*", True

    assert CronSchedule.from_job(FakeJob()) == CronSchedule("0", "30", "2", utc=True)


# --- the DST rule ------------------------------------------------------------------------

def test_local_time_job_follows_local_wall_clock():
    cron = CronSchedule("0", "30", "2", "*", "*", "*")
    # Summer: Berlin is UTC+2, so 02:30 local is 00:30 UTC.
    assert cron.next_after(utc(2024, 7, 1, 12), BERLIN) == utc(2024, 7, 2, 0, 30)
    # Winter: UTC+1.
    assert cron.next_after(utc(2024, 1, 1, 12), BERLIN) == utc(2024, 1, 2, 1, 30)


@pytest.mark.parametrize("tz, day_before, expected", [
    # 02:00 CET -> 03:00 CEST on 31 March
    (BERLIN, utc(2024, 3, 30, 12), ["03-31 03:30 CEST", "04-01 02:30 CEST", "04-02 02:30 CEST"]),
    # 02:00 EST -> 03:00 EDT on 10 March
    (NEW_YORK, utc(2024, 3, 9, 12), ["03-10 03:30 EDT", "03-11 02:30 EDT", "03-12 02:30 EDT"]),
])
def test_daily_0230_on_spring_forward_day_fires_once_at_0330(tz, day_before, expected):
    cron = CronSchedule("0", "30", "2", "*", "*", "*")
    times = fire_times(cron, day_before, 3, tz)
    assert [t.astimezone(tz).strftime("%m-%d %H:%M %Z") for t in times] == expected


@pytest.mark.parametrize("tz, day_before, repeat_day", [
    (BERLIN, utc(2024, 10, 26, 12), 27),    # 03:00 CEST -> 02:00 CET on 27 October
    (NEW_YORK, utc(2024, 11, 2, 12), 3),    # 02:00 EDT -> 01:00 EST on 3 November
])
def test_daily_job_in_repeated_hour_fires_once_at_first_occurrence(tz, day_before, repeat_day):
    # Berlin repeats 02:xx, New York repeats 01:xx.
    hour = 2 if tz is BERLIN else 1
    cron = CronSchedule("0", "30", str(hour), "*", "*", "*")
    first, second = fire_times(cron, day_before, 2, tz)
    local_first = first.astimezone(tz)
    assert (local_first.day, local_first.hour, local_first.minute) == (repeat_day, hour, 30)
    assert local_first.fold == 0  # the first (summer-time) occurrence
    assert first.astimezone(tz).dst() != timedelta(0)
    # The next fire time is a whole day later, not the second occurrence an hour later.
    assert second.astimezone(tz).day == repeat_day + 1
    assert second - first == timedelta(hours=25)


@pytest.mark.parametrize("tz, start", [
    (BERLIN, utc(2024, 3, 30, 22)), (BERLIN, utc(2024, 10, 26, 22)),
    (NEW_YORK, utc(2024, 3, 10, 4)), (NEW_YORK, utc(2024, 11, 3, 3)),
])
def test_every_minute_job_across_transitions_fires_once_per_real_minute(tz, start):
    cron = CronSchedule("0", "*", "*", "*", "*", "*")
    times = fire_times(cron, start, 6 * 60, tz)
    steps = {later - earlier for earlier, later in zip(times, times[1:])}
    # Strictly increasing, never doubled: spring forward keeps one fire per real minute;
    # fall back skips the repeated hour (its wall-clock minutes fired the first time).
    assert min(steps) > timedelta(0)
    assert len(set(times)) == len(times)
    if times[0].astimezone(tz).month == 3:
        assert steps == {timedelta(minutes=1)}
    else:
        assert steps == {timedelta(minutes=1), timedelta(minutes=61)}


def test_spring_forward_every_minute_shifts_gap_then_continues():
    cron = CronSchedule("0", "*", "*", "*", "*", "*")
    times = fire_times(cron, utc(2024, 3, 31, 0, 58), 4, BERLIN)
    assert [t.astimezone(BERLIN).strftime("%H:%M %Z") for t in times] == [
        "01:59 CET", "03:00 CEST", "03:01 CEST", "03:02 CEST"]


def test_search_starting_inside_second_occurrence_never_goes_back():
    cron = CronSchedule("0", "*", "*", "*", "*", "*")
    # 02:15 CET, the second 02:15 of 27 October 2024 in Berlin.
    after = datetime(2024, 10, 27, 2, 15, fold=1, tzinfo=BERLIN)
    found = cron.next_after(after, BERLIN)
    assert found > after
    assert found.astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CET"


@pytest.mark.parametrize("start", [utc(2024, 3, 31, 0, 30), utc(2024, 10, 27, 0, 30)])
def test_utc_job_ignores_local_dst(start):
    cron = CronSchedule("0", "*/15", "*", "*", "*", "*", utc=True)
    times = fire_times(cron, start, 12, BERLIN)
    assert {b - a for a, b in zip(times, times[1:])} == {timedelta(minutes=15)}
    assert times[0] == start + timedelta(minutes=15)


# --- local_zone --------------------------------------------------------------------------

def test_local_zone_from_tz_env(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    assert local_zone() == ZoneInfo("Europe/Berlin")
    monkeypatch.setenv("TZ", ":America/New_York")
    assert local_zone() == ZoneInfo("America/New_York")


def test_local_zone_falls_back_to_utc_with_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TZ", "No/Such_Zone")
    monkeypatch.setattr(schedule_module, "_LOCALTIME", str(tmp_path / "missing"))
    with caplog.at_level("WARNING"):
        zone = local_zone()
    assert zone.utcoffset(datetime(2024, 7, 1)) == timedelta(0)
    assert "No/Such_Zone" in caplog.text and "UTC" in caplog.text


def test_local_zone_from_localtime_symlink(monkeypatch, tmp_path):
    monkeypatch.delenv("TZ", raising=False)
    source = "/usr/share/zoneinfo/America/New_York"
    link = tmp_path / "localtime"
    link.symlink_to(source)
    monkeypatch.setattr(schedule_module, "_LOCALTIME", str(link))
    assert local_zone() == ZoneInfo("America/New_York")


# --- DueQueue ----------------------------------------------------------------------------

def test_empty_queue():
    queue = DueQueue()
    assert queue.next_fire_time() is None
    assert queue.pop_due(utc(2024, 1, 1)) == []
    assert queue.peek("nothing") is None
    queue.remove("nothing")


def test_pop_due_returns_due_jobs_in_time_order_and_reschedules():
    queue = DueQueue()
    now = utc(2024, 1, 1, 0, 0, 0)
    queue.schedule("every5s", CronSchedule("*/5", "*", "*", "*", "*", "*"), UTC, now)
    queue.schedule("minutely", CronSchedule("0", "*", "*", "*", "*", "*"), UTC, now)
    assert queue.next_fire_time() == utc(2024, 1, 1, 0, 0, 5)
    assert queue.pop_due(utc(2024, 1, 1, 0, 0, 4)) == []
    assert queue.pop_due(utc(2024, 1, 1, 0, 1, 0)) == [
        ("every5s", utc(2024, 1, 1, 0, 0, s)) for s in range(5, 60, 5)
    ] + [("every5s", utc(2024, 1, 1, 0, 1)), ("minutely", utc(2024, 1, 1, 0, 1))]
    assert queue.peek("every5s") == utc(2024, 1, 1, 0, 1, 5)
    assert queue.peek("minutely") == utc(2024, 1, 1, 0, 2)


def test_due_before_names_each_live_job_once_up_to_the_moment():
    queue = DueQueue()
    now = utc(2024, 1, 1, 0, 0, 0)
    for second in range(1, 41):
        queue.schedule("at%02d" % second, CronSchedule(str(second), "*", "*", "*", "*", "*"),
                       UTC, now)
    queue.schedule("tick", every_second(), UTC, now)            # one entry, however often
    assert queue.due_before(now) == []
    assert sorted(queue.due_before(now + timedelta(seconds=10))) == (
        ["at%02d" % second for second in range(1, 11)] + ["tick"])
    assert len(queue.due_before(now + timedelta(minutes=5))) == 41
    assert len(queue.due_before(now + timedelta(minutes=5), limit=7)) == 7

    def odd(name):
        return name.startswith("at") and int(name[2:]) % 2 == 1
    assert sorted(queue.due_before(now + timedelta(seconds=10), include=odd)) == [
        "at01", "at03", "at05", "at07", "at09"]
    # Replaced and removed jobs leave stale heap entries: not listed.
    queue.schedule("at05", CronSchedule("30", "5", "*", "*", "*", "*"), UTC, now)
    queue.remove("at06")
    assert len(queue.due_before(now + timedelta(seconds=10))) == 9
    assert DueQueue().due_before(now) == []


def test_slow_loop_yields_every_missed_second_once():
    queue = DueQueue()
    start = utc(2024, 1, 1, 12, 0, 0)
    queue.schedule("tick", every_second(), UTC, start)
    # The loop wakes 3.4 s late: three fire times, none skipped.
    assert queue.pop_due(start + timedelta(seconds=3.4)) == [
        ("tick", start + timedelta(seconds=n)) for n in (1, 2, 3)]
    # Popping again at the same moment yields nothing: none doubled.
    assert queue.pop_due(start + timedelta(seconds=3.4)) == []
    assert queue.next_fire_time() == start + timedelta(seconds=4)


def test_replace_invalidates_the_old_entry():
    queue = DueQueue()
    now = utc(2024, 1, 1)
    queue.schedule("job", CronSchedule("0", "0", "*", "*", "*", "*"), UTC, now)   # hourly
    queue.schedule("job", CronSchedule("0", "*/10", "*", "*", "*", "*"), UTC, now)
    assert len(queue) == 1
    assert queue.peek("job") == utc(2024, 1, 1, 0, 10)
    fired = queue.pop_due(utc(2024, 1, 1, 1, 0))
    assert [fire_time for _, fire_time in fired] == [
        utc(2024, 1, 1, 0, m) for m in (10, 20, 30, 40, 50)] + [utc(2024, 1, 1, 1, 0)]


def test_remove_drops_the_job():
    queue = DueQueue()
    now = utc(2024, 1, 1)
    queue.schedule("gone", every_second(), UTC, now)
    queue.schedule("stays", CronSchedule("0", "*", "*", "*", "*", "*"), UTC, now)
    queue.remove("gone")
    assert "gone" not in queue and queue.peek("gone") is None
    assert queue.next_fire_time() == utc(2024, 1, 1, 0, 1)
    assert queue.pop_due(utc(2024, 1, 1, 0, 1)) == [("stays", utc(2024, 1, 1, 0, 1))]


def test_schedule_that_never_fires_is_not_queued():
    queue = DueQueue()
    assert queue.schedule("past", CronSchedule(year="2001"), UTC, utc(2024, 1, 1)) is None
    assert "past" not in queue and queue.next_fire_time() is None


def test_job_whose_schedule_ends_leaves_the_queue():
    queue = DueQueue()
    once = CronSchedule("0", "0", "0", "1", "1", "*", "2025")
    queue.schedule("once", once, UTC, utc(2024, 6, 1))
    assert queue.pop_due(utc(2026, 1, 1)) == [("once", utc(2025, 1, 1))]
    assert "once" not in queue and queue.next_fire_time() is None


def test_local_time_job_in_queue_fires_once_on_dst_days():
    queue = DueQueue()
    daily = CronSchedule("0", "30", "2", "*", "*", "*")
    queue.schedule("daily", daily, BERLIN, utc(2024, 10, 26, 12))
    fired = queue.pop_due(utc(2024, 10, 28, 12))
    assert [t.astimezone(BERLIN).strftime("%d %H:%M %Z") for _, t in fired] == [
        "27 02:30 CEST", "28 02:30 CET"]


def test_ten_thousand_jobs_idle_queue_is_cheap():
    queue = DueQueue()
    now = utc(2024, 1, 1)
    hourly = CronSchedule("0", "0", "*", "*", "*", "*")
    for n in range(10_000):
        queue.schedule("job%05d" % n, hourly if n else every_second(), UTC, now)
    assert len(queue) == 10_000
    assert queue.next_fire_time() == now + timedelta(seconds=1)

    started = time.perf_counter()
    for _ in range(10_000):
        queue.next_fire_time()
        queue.pop_due(now)          # nothing due: nothing popped
    idle_cost = time.perf_counter() - started
    assert idle_cost < 0.5          # about a microsecond each: no scan of the 10,000

    # One job due: popping it touches that job only, the other 9,999 wait.
    assert queue.pop_due(now + timedelta(seconds=1)) == [("job00000", now + timedelta(seconds=1))]
    assert queue.next_fire_time() == now + timedelta(seconds=2)
    queue.remove("job00000")

    # All due at once: each comes out once, in order, and is queued for the next hour.
    fired = queue.pop_due(utc(2024, 1, 1, 1, 0, 0))
    assert [name for name, _ in fired] == ["job%05d" % n for n in range(1, 10_000)]
    assert {fire_time for _, fire_time in fired} == {utc(2024, 1, 1, 1)}
    assert queue.next_fire_time() == utc(2024, 1, 1, 2)


def test_repeated_replacement_keeps_the_heap_bounded():
    queue = DueQueue()
    now = utc(2024, 1, 1)
    cron = CronSchedule("0", "*", "*", "*", "*", "*")
    for _ in range(10_000):
        queue.schedule("reloaded", cron, UTC, now)
    assert len(queue._heap) < 200
    assert queue.pop_due(utc(2024, 1, 1, 0, 1)) == [("reloaded", utc(2024, 1, 1, 0, 1))]


def test_max_lateness_drops_fire_times_missed_long_ago(caplog):
    queue = DueQueue()
    start = utc(2024, 1, 1, 12, 0, 0)
    queue.schedule("tick", every_second(), UTC, start)
    queue.schedule("hourly", CronSchedule("0", "0", "*", "*", "*", "*"), UTC, start)
    # The host was suspended for a day: only fire times at most 2 s late still fire.
    woke = utc(2024, 1, 2, 12, 0, 0) + timedelta(seconds=0.5)
    with caplog.at_level("WARNING"):
        fired = queue.pop_due(woke, max_lateness=2)
    assert fired == [("tick", utc(2024, 1, 2, 11, 59, 59)), ("hourly", utc(2024, 1, 2, 12)),
                     ("tick", utc(2024, 1, 2, 12))]
    assert "job tick: dropping" in caplog.text and "job hourly: dropping" in caplog.text
    assert queue.peek("tick") == utc(2024, 1, 2, 12, 0, 1)
    assert queue.peek("hourly") == utc(2024, 1, 2, 13)


def test_max_lateness_keeps_a_fire_time_exactly_at_the_cutoff():
    queue = DueQueue()
    queue.schedule("tick", every_second(), UTC, utc(2024, 1, 1, 0, 0, 0))
    fired = queue.pop_due(utc(2024, 1, 1, 0, 0, 10), max_lateness=2)
    assert [t.second for _, t in fired] == [8, 9, 10]
