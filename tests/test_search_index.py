"""The search-engine client against a tiny recording HTTP server on 127.0.0.1.

No real Elasticsearch or OpenSearch here: ``Engine`` records every request and answers
``_search`` with canned hits. ``BlackHole`` accepts connections and never answers, like an
engine that hangs.
"""

import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saltpeter.search_index import INDEX_TIMEOUT, SearchIndex, SearchIndexError
from tests.helpers import free_port


class Engine:
    """Records ``(method, path, json body)``; answers ``_search`` with ``hits``."""

    def __init__(self, status=201):
        self.requests = []
        self.hits = []
        self.status = status
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                engine.requests.append(("POST", self.path, body))
                if "/_search" in self.path:
                    reply, status = {"hits": {"hits": engine.hits}}, 200
                else:
                    reply, status = {"result": "created"}, engine.status
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """A listening socket that accepts and never answers."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        return self

    def __exit__(self, *exc_info):
        self.sock.close()


DOC = {"job_name": "backup", "group": "nightly", "job_instance": "backup_1704164400",
       "@timestamp": "2024-01-02T03:00:00+00:00", "return_code": 0, "machine": "web1",
       "output": "done\n", "msg_type": "machine_result"}


def test_an_event_goes_to_the_daily_index_of_its_utc_date():
    with Engine() as engine:
        index = SearchIndex(engine.url, "saltpeter", "elasticsearch")
        index.index_event(DOC)
        late_local = dict(DOC, **{"@timestamp": "2024-01-02T23:30:00-05:00"})
        index.index_event(late_local)
    assert engine.requests == [("POST", "/saltpeter-2024.01.02/_doc", DOC),
                               ("POST", "/saltpeter-2024.01.03/_doc", late_local)]


def test_an_engine_that_refuses_raises():
    with Engine(status=400) as engine:
        with pytest.raises(SearchIndexError, match="HTTP 400"):
            SearchIndex(engine.url, "sp", "opensearch").index_event(DOC)


def test_a_down_engine_fails_fast():
    index = SearchIndex("http://127.0.0.1:%d" % free_port(), "saltpeter", "elasticsearch")
    started = time.monotonic()
    with pytest.raises(SearchIndexError, match="unreachable"):
        index.index_event(DOC)
    assert time.monotonic() - started < 1.0


def test_a_hanging_engine_costs_at_most_the_index_timeout():
    with BlackHole() as hole:
        index = SearchIndex(hole.url, "saltpeter", "elasticsearch")
        started = time.monotonic()
        with pytest.raises(SearchIndexError):
            index.index_event(DOC)
        assert time.monotonic() - started < INDEX_TIMEOUT + 1.0


def test_timeline_queries_every_daily_index_and_maps_hits():
    with Engine() as engine:
        engine.hits = [{"_source": {"job_name": "backup", "job_instance": "backup_1",
                                    "msg_type": "machine_start", "return_code": 0,
                                    "@timestamp": "2024-01-02T03:00:00+00:00"}},
                       {"_source": {"job_name": "backup", "job_instance": "backup_1",
                                    "msg_type": "machine_result", "return_code": 2,
                                    "@timestamp": "2024-01-02T03:00:05+00:00"}}]
        index = SearchIndex(engine.url, "saltpeter", "opensearch")
        content = index.timeline(datetime(2024, 1, 2, tzinfo=timezone.utc),
                                 datetime(2024, 1, 3, tzinfo=timezone.utc))
    assert content == [
        {"cron": "backup", "job_instance": "backup_1", "msg_type": "machine_start",
         "ret_code": 0, "timestamp": "2024-01-02T03:00:00+00:00"},
        {"cron": "backup", "job_instance": "backup_1", "msg_type": "machine_result",
         "ret_code": 2, "timestamp": "2024-01-02T03:00:05+00:00"}]
    method, path, body = engine.requests[0]
    assert path.startswith("/saltpeter-%2A/_search") or path.startswith("/saltpeter-*/_search")
    filters = body["query"]["bool"]["filter"]
    assert filters[0]["range"]["@timestamp"] == {"gte": "2024-01-02T00:00:00+00:00",
                                                 "lte": "2024-01-03T00:00:00+00:00"}
    assert filters[1] == {"terms": {"msg_type": ["machine_start", "machine_result"]}}


def test_from_options():
    assert SearchIndex.from_options({}) is None
    assert SearchIndex.from_options({"elasticsearch": "", "opensearch": ""}) is None
    index = SearchIndex.from_options({"elasticsearch": "es.example:9200", "index": "cron"})
    assert (index.url, index.index, index.flavor) == ("http://es.example:9200", "cron",
                                                      "elasticsearch")
    assert SearchIndex.from_options({"opensearch": "http://os:9200/"}).url == "http://os:9200"
    with pytest.raises(ValueError):
        SearchIndex("http://x", "i", "solr")
