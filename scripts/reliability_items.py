"""Items 1-6 of the reliability suite: each limit, hostile input, fault, shutdown and secrecy
promise of docs/architecture.md, judged by the tests that prove it, and the fuzz targets run for
a while.

`scripts/reliability.py --tests` runs these before its load scenarios and puts their rows in the
same table. Each row names the tests behind it; a row passes when every one of them passes.
"""

import re
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    test: str
    target: str
    # (cargo package, test target: "lib" or an integration test's name, exact test names)
    cases: tuple


ITEMS = (
    Item("1. CL+TE together, duplicate or bad Content-Length", "400 and close, upstream untouched", (
        ("proxy", "proxy", ("content_length_with_transfer_encoding_gets_400_and_a_closed_connection",
                            "a_repeated_or_malformed_content_length_is_refused_and_never_reaches_the_upstream")),
    )),
    Item("1. request headers over 64 KiB", "431", (
        ("proxy", "proxy", ("oversized_headers_get_431_and_never_reach_the_upstream",)),
    )),
    Item("1. body over the model's limit", "413 without reading the rest", (
        ("proxy", "proxy", ("a_body_over_the_models_limit_is_refused_before_the_upstream_sees_it",
                            "a_large_upload_passes_whole_when_within_the_models_limit")),
    )),
    Item("1. slowloris head, idle keep-alive", "closed at 10 s / 60 s (shortened in the tests)", (
        ("proxy", "proxy", ("a_request_head_trickling_in_is_cut_off_at_the_header_read_timeout",
                            "the_header_timer_restarts_for_each_request_on_a_kept_alive_connection",
                            "an_idle_client_connection_is_closed_after_the_keepalive_idle_time")),
    )),
    Item("1. body after an early 401/403/404/413", "never parsed as a next request", (
        ("proxy", "hostile", ("a_body_after_an_early_refusal_is_never_read_as_the_next_request",)),
    )),
    Item("1. path confusion (.., %2e%2e, %2f, //, ;, \\, case)", "never reaches another model", (
        ("proxy", "hostile", ("a_token_for_one_model_never_reaches_another_by_any_spelling_of_the_path",)),
        ("proxy", "lib", ("request::tests::other_paths_name_no_model",
                          "request::tests::dots_and_encoded_slashes_inside_a_segment_are_forwarded")),
    )),
    Item("1. upstream killed mid-response, malformed answer", "502 / SSE error event; connection not reused", (
        ("proxy", "hostile", ("an_upstream_that_dies_is_a_502_a_cut_body_or_an_sse_error_event",
                              "a_malformed_upstream_answer_is_a_502_and_its_connection_is_not_reused")),
    )),
    Item("2. admission caps", "429 + Retry-After at once", (
        ("runtime", "server", (
            "beyond_the_admission_limit_requests_get_429_with_retry_after",
            "a_burst_on_a_rested_model_is_refused_where_waiting_would_more_than_quadruple_it",
            "without_a_burst_allowance_a_burst_is_refused_where_waiting_would_double_it",
        )),
        ("runtime", "generation", ("beyond_its_admission_limit_the_server_answers_429",
                                   "a_sequence_that_would_wait_for_a_slot_too_long_is_refused_at_once")),
    )),
    Item("2. JSON, inputs, multipart and audio limits", "413/422/400 naming the field", (
        ("runtime", "server", ("bad_bodies_get_4xx_naming_the_problem_and_the_server_keeps_serving",)),
        ("runtime", "speech", ("every_kind_of_bad_upload_is_a_4xx_that_names_the_problem",
                               "a_two_hour_recording_is_refused_at_the_duration_limit_without_decoding_it_all")),
    )),
    Item("2. client gone or deadline passed", "work stops within 1 s, counted", (
        ("runtime", "generation", ("a_client_that_disconnects_stops_its_sequence",
                                   "a_deadline_ends_the_stream_with_an_error_event_and_stops_the_sequence")),
        ("runtime", "speech", ("a_request_past_its_deadline_stops_its_work_within_a_second",)),
        ("runtime", "server", ("requests_past_their_deadline_are_dropped_before_batching",)),
    )),
    Item("2. management or model-load routes", "none (404/405)", (
        ("runtime", "server", ("no_route_loads_registers_or_manages_models",)),
    )),
    Item("3. chat-template bombs", "400 within 50 ms CPU; runtime alive; RSS <= +64 MiB", (
        ("runtime", "generation", ("memory_bomb_templates_are_refused_without_harming_the_runtime",
                                   "bad_requests_name_the_field_and_hostile_templates_run_out_of_budget")),
    )),
    Item("4. proxy SIGTERM, 150 unary + 50 SSE in flight; new connections after it", "0 failed, 0 truncated; served until idle", (
        ("proxy", "proxy", ("sigterm_with_200_requests_in_flight_fails_and_truncates_none",
                            "after_sigterm_new_connections_are_served_until_clients_stop_coming_then_it_exits")),
    )),
    Item("4. runtime SIGTERM", "readiness false < 1 s, in-flight work finished", (
        ("runtime", "speech", ("sigterm_turns_readiness_off_at_once_and_finishes_the_work_in_flight",)),
        ("runtime", "server", ("sigterm_finishes_requests_in_progress",)),
    )),
    Item("4. chart terminationGracePeriodSeconds", ">= max deadline + preStop + 10 s", (
        ("e2e", "chart", ("default_values_install_a_cluster_internal_proxy_with_a_disruption_budget",)),
    )),
    Item("5. canary: proxy at TRACE, bodies, metrics", "0 hits (raw, base64, %-encoded, 12 chars)", (
        ("proxy", "proxy", ("no_error_path_writes_the_token_to_logs_bodies_or_metrics",)),
    )),
    Item("5. canary: operator at TRACE, Events, status", "0 hits", (
        ("operator", "controllers",
         ("the_binary_leads_serves_health_and_metrics_and_no_token_reaches_logs_events_or_status",)),
    )),
    Item("5. checksum vs 100 000 one-character mutations", "100 % refused before lookup", (
        ("crds", "lib", ("token::tests::every_one_character_substitution_is_refused_before_any_lookup",)),
    )),
)

RESULT = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", re.M)
BOMB_CPU = re.compile(r"([\d.]+) ms of CPU")


def _run_cases():
    """Runs every listed test, one cargo invocation per test target. Returns the results by
    (package, target, name), and everything the bomb test printed."""
    by_target = {}
    for item in ITEMS:
        for package, target, names in item.cases:
            by_target.setdefault((package, target), []).extend(names)
    results, output = {}, ""
    for (package, target), names in by_target.items():
        selector = ["--lib"] if target == "lib" else ["--test", target]
        command = ["cargo", "test", "--locked", "-p", package, *selector, "--",
                   "--exact", "--nocapture", *sorted(set(names))]
        run = subprocess.run(command, capture_output=True, text=True)
        output += run.stdout + run.stderr
        for name, verdict in RESULT.findall(run.stdout):
            results[(package, target, name)] = verdict
    return results, output


def test_rows():
    results, output = _run_cases()
    rows = []
    for item in ITEMS:
        names = [(p, t, n) for p, t, ns in item.cases for n in ns]
        passed = sum(results.get(name) == "ok" for name in names)
        measured = f"{passed}/{len(names)} tests pass"
        if item.test.startswith("3."):
            spent = [float(ms) for ms in BOMB_CPU.findall(output)]
            if spent:
                measured += f"; bombs {len(spent)}, max {max(spent):.1f} ms CPU"
        rows.append({"test": item.test, "measured": measured, "target": item.target,
                     "pass": passed == len(names)})
        for name in names:
            if results.get(name) != "ok":
                print(f"reliability: {'::'.join(name)}: {results.get(name, 'not run')}",
                      file=sys.stderr)
    return rows


FUZZ_LINE = re.compile(r"^fuzz (\S+)\s+(\d+) runs\s+(\d+) corpus\s+(\S+)", re.M)


def fuzz_rows(seconds):
    run = subprocess.run(["bash", "scripts/fuzz.sh", "--seconds", str(seconds)],
                         capture_output=True, text=True)
    targets = FUZZ_LINE.findall(run.stdout)
    crashed = [name for name, _, _, verdict in targets if verdict != "ok"]
    runs = sum(int(count) for _, count, _, _ in targets)
    return [{
        "test": f"6. cargo fuzz, {len(targets)} targets x {seconds} s",
        "measured": f"{runs:,} runs, {len(crashed)} crashes" + (f" ({', '.join(crashed)})" if crashed else ""),
        "target": ">= 8 targets, 0 crashes",
        "pass": run.returncode == 0 and len(targets) >= 8 and not crashed,
    }]
