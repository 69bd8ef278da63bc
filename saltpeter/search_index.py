"""Elasticsearch / OpenSearch over plain HTTP (urllib only, no client library).

Events are indexed into one index per UTC day, ``<index>-YYYY.MM.DD`` (the legacy
layout, so existing dashboards keep working), as the legacy document
``{job_name, group, job_instance, '@timestamp', return_code, machine, output, msg_type}``.
The API reads the timeline back from ``<index>-*``.

Both engines speak the same REST for what is used here (``_doc`` and ``_search``);
``flavor`` only names the engine in logs and errors.
"""

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Union

log = logging.getLogger(__name__)

INDEX_TIMEOUT = 2.0          # seconds: a job event never waits longer on the engine
SEARCH_TIMEOUT = 10.0        # seconds: a timeline query
TIMELINE_MAX_HITS = 10000    # the engines' default max result window
TIMELINE_MSG_TYPES = ("machine_start", "machine_result")
FLAVORS = ("elasticsearch", "opensearch")


class SearchIndexError(Exception):
    """The engine could not be reached or refused the request."""


def _as_utc(moment: Union[datetime, str]) -> datetime:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class SearchIndex:
    """One search engine at ``url`` with daily indexes named ``<index>-YYYY.MM.DD``."""

    def __init__(self, url: str, index: str = "saltpeter", flavor: str = "elasticsearch"):
        if flavor not in FLAVORS:
            raise ValueError("unknown search engine flavor %r (expected one of %s)"
                             % (flavor, ", ".join(FLAVORS)))
        if "://" not in url:
            url = "http://" + url
        self.url = url.rstrip("/")
        self.index = index
        self.flavor = flavor

    def __repr__(self) -> str:
        return "%s %s index %s" % (self.flavor, self.url, self.index)

    @classmethod
    def from_options(cls, options: Dict[str, Any]) -> Optional["SearchIndex"]:
        """The engine named by ``options['opensearch']`` or ``options['elasticsearch']``
        (daemon flags ``-o``/``-e``), with ``options['index']``; None if neither is set."""
        index = options.get("index") or "saltpeter"
        for flavor in ("opensearch", "elasticsearch"):
            if options.get(flavor):
                return cls(options[flavor], index, flavor)
        return None

    def daily_index(self, moment: Union[datetime, str]) -> str:
        """``<index>-YYYY.MM.DD`` for the UTC date of ``moment``."""
        return "%s-%s" % (self.index, _as_utc(moment).strftime("%Y.%m.%d"))

    def _request(self, path: str, body: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body, default=str).encode("utf-8"),
            method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace")
            raise SearchIndexError("%s answered HTTP %s on %s: %s"
                                   % (self, exc.code, path, detail)) from exc
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused, bad URL
            raise SearchIndexError("%s unreachable on %s: %s" % (self, path, exc)) from exc
        try:
            return json.loads(payload or b"{}")
        except ValueError as exc:
            raise SearchIndexError("%s answered non-JSON on %s" % (self, path)) from exc

    def index_event(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        """Index one event document into the daily index of its ``@timestamp``.

        Waits at most ``INDEX_TIMEOUT`` seconds; raises ``SearchIndexError`` on any
        failure (the caller logs it and goes on)."""
        moment = doc.get("@timestamp") or datetime.now(timezone.utc)
        path = "/%s/_doc" % urllib.parse.quote(self.daily_index(moment))
        return self._request(path, doc, INDEX_TIMEOUT)

    def timeline(self, start: datetime, end: datetime) -> List[Dict[str, Any]]:
        """``machine_start``/``machine_result`` events with ``start <= @timestamp <= end``,
        oldest first, as timeline entries ``{cron, job_instance, msg_type, ret_code,
        timestamp}``. Raises ``SearchIndexError`` if the engine fails."""
        query = {
            "size": TIMELINE_MAX_HITS,
            "sort": [{"@timestamp": {"order": "asc"}}],
            "_source": ["job_name", "job_instance", "msg_type", "return_code", "@timestamp"],
            "query": {"bool": {"filter": [
                {"range": {"@timestamp": {"gte": _as_utc(start).isoformat(),
                                          "lte": _as_utc(end).isoformat()}}},
                {"terms": {"msg_type": list(TIMELINE_MSG_TYPES)}},
            ]}},
        }
        path = "/%s/_search?ignore_unavailable=true&allow_no_indices=true" % (
            urllib.parse.quote(self.index + "-*"))
        reply = self._request(path, query, SEARCH_TIMEOUT)
        entries = []
        for hit in reply.get("hits", {}).get("hits", []):
            source = hit.get("_source") or {}
            entries.append({
                "cron": source.get("job_name"),
                "job_instance": source.get("job_instance"),
                "msg_type": source.get("msg_type"),
                "ret_code": source.get("return_code"),
                "timestamp": source.get("@timestamp"),
            })
        return entries
