"""Progress lines of tools/preprocess_data.py (docs/s, MB/s, tokens/s, ETA) on stderr."""

import sys
import time


class Progress:
    """Prints docs/s, MB/s, tokens/s and ETA every `interval` documents (to stderr)."""

    def __init__(self, interval: int, total_input_bytes: int) -> None:
        self.interval = interval
        self.total = total_input_bytes
        self.start = time.time()
        self.next_report = interval
        self.tty = sys.stderr.isatty()
        self.input_bytes = 0

    def update(self, summary, input_bytes: int) -> None:
        self.input_bytes += input_bytes
        if not self.interval or summary.documents < self.next_report:
            return
        self.next_report = (summary.documents // self.interval + 1) * self.interval
        elapsed = max(time.time() - self.start, 1e-9)
        eta = "?"
        if self.total and self.input_bytes:
            left = elapsed * max(self.total - self.input_bytes, 0) / self.input_bytes
            eta = time.strftime("%H:%M:%S", time.gmtime(left))
        done = f" {100 * self.input_bytes / self.total:5.1f}%" if self.total else ""
        line = (
            f"[preprocess]{done} {summary.documents} docs | {summary.documents / elapsed:.0f} "
            f"docs/s | {summary.text_bytes / 1e6 / elapsed:.2f} MB/s | "
            f"{summary.tokens / elapsed:.0f} tokens/s | ETA {eta}"
        )
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.tty and self.interval:
            print(file=sys.stderr)
