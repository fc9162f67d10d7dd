"""`flux-schnell report DIR`: what a draft folder's runs cost, from its `manifest.jsonl` alone.

Every record the api runs appended carries its image's billing record (`paid_calls`: calls that
may have been billed, the one that delivered included; `free_retries`; the service's
`request_ids`). The report adds them up over every run into the folder (a resumed run appends its
own records): images delivered, calls that may have been billed, those billed without an image
(with their request ids and times, the list to send with a refund claim), duplicates requested
once, failures. `--csv FILE` writes one row per call that may have been billed.

An async job that passed `deadline_s` is recorded "failed" with its `poll_url` and its paid call;
a later run that collects it records "done" with `collected_from` (that URL) and `paid_calls` 0. The
report counts such an image once, delivered, with the one paid call that made it, and the failed
record is not a failure. The manifest is read twice, lazily (first for the collected poll URLs);
only the counts, those URLs and the first `MAX_LISTED` unpaid-for calls are held.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import MANIFEST_NAME, RecordStatus, read_manifest
from .png_files import write_atomically

MAX_LISTED = 20  # calls billed without an image listed on the terminal (the CSV has them all)
CSV_COLUMNS = ("time", "line", "prompt", "file", "status", "request_id", "delivered_an_image")


@dataclass
class BillingReport:
    """What the records of one manifest add up to."""

    delivered: int = 0  # images the service delivered (found on disk after a kill included)
    collected: int = 0  # of those, collected by a later run from a job an earlier run paid for
    paid_calls: int = 0  # calls that may have been billed
    paid_without_image: int = 0  # of those, calls after which no image was delivered
    free_retries: int = 0
    duplicates: int = 0
    failures: int = 0
    records_without_billing: int = 0  # local-backend lines, or manifests older than the billing fields
    listed: list[dict] = field(default_factory=list)  # the first MAX_LISTED calls billed without an image


def read_report(folder: Path, csv_rows=None) -> BillingReport:
    """The report of `folder`'s manifest; each call that may have been billed goes to `csv_rows(row)`."""
    report = BillingReport()
    manifest = Path(folder) / MANIFEST_NAME
    collected = _collected_poll_urls(manifest)
    for record in read_manifest(manifest):
        status = record["status"]
        if status == RecordStatus.DUPLICATE:
            report.duplicates += 1
            continue
        poll_url = record.get("poll_url")
        # a failed record whose job a later run collected: its paid call delivered
        later = status == RecordStatus.FAILED and isinstance(poll_url, str) and poll_url in collected
        if status == RecordStatus.DONE:
            report.delivered += 1
            report.collected += isinstance(record.get("collected_from"), str)
        elif not later:
            report.failures += 1
        paid = record.get("paid_calls")
        if not isinstance(paid, int) or isinstance(paid, bool):
            report.records_without_billing += 1
            continue
        report.paid_calls += paid
        free = record.get("free_retries")
        report.free_retries += free if isinstance(free, int) and not isinstance(free, bool) else 0
        ids = [i for i in record.get("request_ids") or [] if isinstance(i, str)]
        delivered = status == RecordStatus.DONE or later
        for k in range(paid):
            row = _row(record, ids[k] if k < len(ids) else "", delivered and k == paid - 1)
            if row["delivered_an_image"] == "no":
                report.paid_without_image += 1
                if len(report.listed) < MAX_LISTED:
                    report.listed.append(row)
            if csv_rows is not None:
                csv_rows(row)
    return report


def _collected_poll_urls(manifest: Path) -> set[str]:
    """The poll URLs of the jobs a run collected (its "done" records' `collected_from`)."""
    urls: set[str] = set()
    for record in read_manifest(manifest):
        url = record.get("collected_from")
        if record["status"] == RecordStatus.DONE and isinstance(url, str):
            urls.add(url)
    return urls


def _row(record: dict, request_id: str, delivered: bool) -> dict:
    stamp = record.get("time")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if isinstance(stamp, (int, float)) else ""
    return {
        "time": when,
        "line": record.get("line", ""),
        "prompt": record.get("prompt", ""),
        "file": record.get("file", ""),
        "status": record["status"],
        "request_id": request_id,
        "delivered_an_image": "yes" if delivered else "no",
    }


def write_report(folder: Path, csv_path: Path | None = None) -> BillingReport:
    """The report, and with `csv_path` its CSV (written atomically: never half a file)."""
    if csv_path is None:
        return read_report(folder)
    holder: list[BillingReport] = []

    def write(binary) -> None:
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        holder.append(read_report(folder, writer.writerow))
        text.flush()
        text.detach()

    write_atomically(csv_path, write)
    return holder[0]
