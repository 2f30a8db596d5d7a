"""Rewards computed on the host: a reward server over HTTP, or any Python function.

Every reward here follows the package convention `reward(images, prompts) -> scores [B]` with
`images` `[B, H, W, 3]` float in [0, 1] and `prompts` strings or the metadata dicts of a prompt set,
but runs on the host (NumPy in, NumPy out), so it is not traceable by JAX. `as_jax` (or
`host_reward`) turns one into a jittable `(images, prompt_ids) -> scores [B] float32` through
`jax.pure_callback`, so it can be called inside the trainer's jitted `score` step.

- `RemoteReward`: a generic JSON protocol (any language can serve it).
  Request  POST `url`, `Content-Type: application/json`, body
           `{"images": [base64 JPEG or PNG], "prompts": [str], "metadata": [dict], **extra}`;
           a string prompt `p` has metadata `{"prompt": p}`, a dict prompt is its own metadata and
           its `"prompt"` key (or "") is the prompt string.
  Reply    `{"scores": [float] * B, ...}`; any other key holding B numbers (None = NaN) is a
           per-sample metric (`.metrics` of the last call, e.g. component scores).
- `GenEvalRemoteReward`: the protocol of the GenEval reward server that Flow-GRPO users run
  (github.com/yifan123/reward-server `app_geneval.py`, client `flow_grpo/rewards.py:geneval_score`):
  pickled request and reply; see the class docstring.
- `CallbackReward`: wraps `fn(images float32 [B,H,W,3] in [0,1], prompts list) -> scores [B]`.

Failure policy of the remote rewards: a request is attempted `1 + retries` times with exponential
backoff (`backoff * 2**k` seconds, capped at `max_backoff`) on connection errors, timeouts, HTTP 5xx
/ 408 / 429 and malformed replies (undecodable body, missing key, wrong length, non-numeric or
non-finite scores unless `allow_nan=True`); then `RewardServerError` names the URL, the number of
attempts and the last error. Other HTTP 4xx answers (a bad request will not get better) raise at
once. A batch is never dropped nor zero-filled. `timeout` is urllib's: it bounds the connection and
every wait for bytes, not the total transfer time. Proxy environment variables are ignored (reward
servers live next to the trainer).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import http.client
import io
import json
import pickle
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["RewardServerError", "HostReward", "RemoteReward", "GenEvalRemoteReward", "CallbackReward",
           "as_jax", "host_reward", "images_to_uint8", "encode_image"]


class RewardServerError(RuntimeError):
    """A reward server gave no usable answer after all attempts (or refused the request)."""


class _Malformed(ValueError):
    """A reply that arrived but cannot be used (retried like a server error)."""


# ----------------------------------------------------------------------------- images and prompts

def images_to_uint8(images) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] (or uint8) -> uint8, rounded as Flow-GRPO does ((x * 255).round())."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (NHWC RGB), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    x = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """One uint8 [H, W, 3] image as JPEG or PNG bytes (Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    elif fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()


def _prompt_and_metadata(p) -> tuple[str, dict]:
    if isinstance(p, str):
        return p, {"prompt": p}
    if dataclasses.is_dataclass(p) and not isinstance(p, type):
        p = dataclasses.asdict(p)
    if isinstance(p, Mapping):
        meta = dict(p)
        return str(meta.get("prompt", meta.get("text", ""))), meta
    raise TypeError(f"a prompt must be a string or a metadata dict, got {type(p).__name__}: {p!r:.80}")


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot send {type(x).__name__} to a JSON reward server: {x!r:.80}")


def _as_scores(values, n: int, what: str, *, allow_nan: bool) -> np.ndarray:
    """Validated float32 [n] from a reply's list (raises _Malformed)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        raise _Malformed(f"{what} is not a list (got {type(values).__name__})")
    if len(values) != n:
        raise _Malformed(f"{what} has {len(values)} entries for {n} images")
    out = np.empty(n, np.float32)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _Malformed(f"{what}[{i}] is not a number: {v!r:.60}")
        out[i] = float(v)
    if not allow_nan and not np.all(np.isfinite(out)):
        raise _Malformed(f"{what} holds non-finite values at {np.flatnonzero(~np.isfinite(out)).tolist()[:8]} "
                         "(pass allow_nan=True to accept them)")
    return out


def _as_metric(values, n: int):
    """float32 [n] of a per-sample numeric list (None -> NaN), or None when it is not one."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        return None
    if len(values) != n:
        return None
    try:
        return np.asarray([np.nan if v is None else float(v) for v in values], np.float32)
    except (TypeError, ValueError):
        return None


def _concat_metrics(parts: list[dict], sizes: list[int]) -> dict[str, np.ndarray]:
    """Chunk metrics -> batch metrics; a key missing from some chunk is NaN there."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    nan = lambda n: np.full(n, np.nan, np.float32)
    return {k: np.concatenate([np.asarray(p[k], np.float32).reshape(n) if k in p else nan(n)
                               for p, n in zip(parts, sizes)])
            for k in keys}


# ----------------------------------------------------------------------------- base class

class HostReward:
    """A reward that runs on the host. Subclasses implement `_score_chunk(images, prompts)`.

    `score(images, prompts) -> (scores float32 [B], metrics {name: float32 [B]})` is stateless and
    thread-safe (the JAX bridge may call it from several threads at once); `__call__` returns the
    scores and keeps the metrics of the last call in `.metrics`.
    """

    jittable = False
    #: `_score_chunk` takes uint8 images (remote) or float32 in [0, 1] (callbacks)
    _uint8 = True

    def __init__(self, *, batch_size: int | None = None, concurrency: int = 1):
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        if int(concurrency) < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.concurrency = int(concurrency)
        self.metrics: dict[str, np.ndarray] = {}

    def _score_chunk(self, images: np.ndarray, prompts: list) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _prepare(self, images):
        if self._uint8:
            return images_to_uint8(images)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC RGB), got shape {images.shape}")
        return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)

    def score(self, images, prompts) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images = self._prepare(images)
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        prompts = list(prompts)
        n = images.shape[0]
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt (or metadata dict) per image")
        if n == 0:
            return np.zeros(0, np.float32), {}
        step = self.batch_size or n
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
        run = lambda b: self._score_chunk(images[b[0]:b[1]], prompts[b[0]:b[1]])
        if self.concurrency > 1 and len(bounds) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(bounds))) as pool:
                results = list(pool.map(run, bounds))  # in order; the first exception propagates
        else:
            results = [run(b) for b in bounds]
        sizes = [hi - lo for lo, hi in bounds]
        for (scores, _), size in zip(results, sizes):
            if np.shape(scores) != (size,):  # guards subclasses; chunk parsers already check this
                raise ValueError(f"{type(self).__name__} returned scores of shape {np.shape(scores)} for {size} images")
        scores = np.concatenate([np.asarray(s, np.float32) for s, _ in results])
        return scores, _concat_metrics([m for _, m in results], sizes)

    def __call__(self, images, prompts) -> np.ndarray:
        scores, metrics = self.score(images, prompts)
        self.metrics = metrics
        return scores

    def as_jax(self, prompts, *, metrics: Sequence[str] = (), sharding=None):
        """A jittable `(images, prompt_ids) -> scores [B] float32` over a table of prompts; see `as_jax`."""
        return as_jax(self, prompts, metrics=metrics, sharding=sharding)


# ----------------------------------------------------------------------------- HTTP

class _HTTPReward(HostReward):
    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float, max_backoff: float,
                 batch_size: int | None, concurrency: int, allow_nan: bool):
        super().__init__(batch_size=batch_size, concurrency=concurrency)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0 (got {timeout}, {retries}, {backoff})")
        self.url, self.timeout, self.retries = url, float(timeout), int(retries)
        self.backoff, self.max_backoff, self.allow_nan = float(backoff), float(max_backoff), bool(allow_nan)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def attempts(self) -> int:
        return 1 + self.retries

    def _post(self, body: bytes, content_type: str, parse: Callable[[bytes], Any]):
        """POST with retries; `parse(raw)` validates the reply (raising _Malformed)."""
        last = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": content_type})
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = _snippet(_read_quietly(e))
                if 500 <= e.code < 600 or e.code in (408, 429):
                    last = f"HTTP {e.code} {e.reason}: {detail}"
                    continue
                raise RewardServerError(f"reward server {self.url} refused the request with HTTP {e.code} "
                                        f"{e.reason} (a client error, not retried): {detail}") from None
            except (TimeoutError, socket.timeout) as e:
                last = f"timed out after {self.timeout:g} s ({e})"
                continue
            except urllib.error.URLError as e:
                reason = e.reason
                last = (f"timed out after {self.timeout:g} s while connecting" if isinstance(reason, (TimeoutError, socket.timeout))
                        else f"cannot connect: {reason}")
                continue
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = f"connection error: {type(e).__name__}: {e}"
                continue
            try:
                return parse(raw)
            except _Malformed as e:
                last = f"malformed reply: {e}"
        raise RewardServerError(f"reward server {self.url} gave no usable answer after {self.attempts} attempt"
                                f"{'s' if self.attempts > 1 else ''} (timeout {self.timeout:g} s, retries "
                                f"{self.retries}, backoff {self.backoff:g} s); last error: {last}")


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read()
    except Exception:  # noqa: BLE001 - the status is the error, the body only a detail
        return b""


def _snippet(raw: bytes, limit: int = 400) -> str:
    text = raw.decode("utf-8", "replace").strip()
    if len(text) > limit:  # tracebacks end with the interesting line
        text = "..." + text[-limit:]
    return text or "(empty body)"


class RemoteReward(_HTTPReward):
    """A reward server speaking JSON (see the module docstring for the protocol).

    Args:
      url: where to POST, e.g. "http://127.0.0.1:18090/score".
      timeout: seconds for connecting and for each wait on the socket.
      retries: further attempts after the first one; `backoff * 2**k` seconds between them.
      batch_size: images per request (None: the whole batch in one request); order is kept.
      image_format: "jpeg" (quality `jpeg_quality`) or "png" (lossless), base64 in the JSON body.
      extra: more JSON-serialisable keys merged into every request body (e.g. {"model": "pickscore"}).
      allow_nan: accept NaN / inf scores (otherwise a reply holding one is malformed).
      concurrency: requests in flight at once when a batch is split (for multi-worker servers).
    """

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int | None = None, image_format: str = "jpeg", jpeg_quality: int = 95,
                 extra: Mapping[str, Any] | None = None, allow_nan: bool = False, concurrency: int = 1,
                 max_backoff: float = 30.0):
        super().__init__(url, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                         batch_size=batch_size, concurrency=concurrency, allow_nan=allow_nan)
        if image_format not in ("jpeg", "png"):
            raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
        extra = dict(extra or {})
        clash = {"images", "prompts", "metadata"} & set(extra)
        if clash:
            raise ValueError(f"extra must not override the protocol keys {sorted(clash)}")
        json.dumps(extra, default=_json_default)  # fail now, not at the first training step
        self.image_format, self.jpeg_quality, self.extra = image_format, int(jpeg_quality), extra

    def _score_chunk(self, images, prompts):
        pairs = [_prompt_and_metadata(p) for p in prompts]
        body = {"images": [base64.b64encode(encode_image(im, self.image_format, self.jpeg_quality)).decode("ascii")
                           for im in images],
                "prompts": [p for p, _ in pairs], "metadata": [m for _, m in pairs], **self.extra}
        data = json.dumps(body, default=_json_default).encode("utf-8")
        n = len(images)

        def parse(raw):
            try:
                reply = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Malformed(f"not JSON ({e}): {_snippet(raw, 120)}") from None
            if not isinstance(reply, dict):
                raise _Malformed(f"expected a JSON object, got {type(reply).__name__}")
            if "scores" not in reply:
                raise _Malformed(f"no 'scores' key (keys: {sorted(reply)[:10]})")
            scores = _as_scores(reply["scores"], n, "'scores'", allow_nan=self.allow_nan)
            metrics = {k: m for k, v in reply.items() if k != "scores" and (m := _as_metric(v, n)) is not None}
            return scores, metrics

        return self._post(data, "application/json", parse)


class GenEvalRemoteReward(_HTTPReward):
    """Client of the GenEval reward server used with Flow-GRPO (yifan123/reward-server `app_geneval.py`).

    Protocol (read from that server and from Flow-GRPO's `flow_grpo/rewards.py:geneval_score`):
      request: POST to the server root (default port 18085), body
               `pickle.dumps({"images": [JPEG bytes], "meta_datas": [dict], "only_strict": bool})`;
               the server opens the images with `formats=["jpeg"]`, so JPEG is required. Flow-GRPO
               sends batches of 64, saved with Pillow's default JPEG quality (75, the default here).
               Each metadata dict is a GenEval prompt record: `tag` (single_object, two_object,
               counting, colors, position, color_attr), `prompt`, `include` [{class, count, color?,
               position?}], `exclude`?; the server reads `tag` and `prompt` directly.
      reply:   HTTP 200 with `pickle.dumps({"scores", "rewards", "strict_rewards", "group_rewards",
               "group_strict_rewards"})`, or HTTP 500 with a traceback as text:
               - scores: partial credit in [0, 1] (per include clause 1 - |count error| / count, and
                 color / position terms, averaged): the training reward of Flow-GRPO;
               - strict_rewards: 1.0 when every clause holds with *exact* counts, else 0.0;
               - rewards: 1.0 when the original GenEval rule holds (at least the asked counts, no
                 excluded objects); all 0.0 when `only_strict` (the server then skips that check);
               - group_rewards / group_strict_rewards: {tag: [B floats]} with -10.0 for samples of
                 other tags.
    Mapping here: the reward is `scores`; `.metrics` holds `accuracy` = strict_rewards, per tag
    `accuracy_<tag>` (NaN for other tags instead of -10), and unless `only_strict`,
    `geneval_accuracy` = rewards and `geneval_accuracy_<tag>` (NaN when only_strict). Note the names:
    Flow-GRPO logs strict_rewards as `strict_accuracy` and rewards as `accuracy`.

    Trust: the reply is unpickled, and unpickling runs whatever code the bytes ask for. Only talk to
    a server you run yourself, on localhost or a trusted network (the server equally unpickles what
    it receives, so it must not be reachable by others).
    """

    TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

    def __init__(self, url: str = "http://127.0.0.1:18085", *, only_strict: bool = False, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, batch_size: int | None = 64, jpeg_quality: int = 75,
                 concurrency: int = 1, max_backoff: float = 30.0, allow_nan: bool = False):
        super().__init__(url, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                         batch_size=batch_size, concurrency=concurrency, allow_nan=allow_nan)
        self.only_strict, self.jpeg_quality = bool(only_strict), int(jpeg_quality)

    @staticmethod
    def _metadata(p) -> dict:
        if dataclasses.is_dataclass(p) and not isinstance(p, type):
            p = dataclasses.asdict(p)
        if not isinstance(p, Mapping):
            raise TypeError("GenEvalRemoteReward needs the GenEval metadata dict of each prompt (with 'tag', "
                            "'prompt', 'include', ...: a line of GenEval's evaluation_metadata.jsonl), "
                            f"got {type(p).__name__}: {p!r:.80}")
        missing = [k for k in ("tag", "prompt") if k not in p]
        if missing:
            raise ValueError(f"GenEval metadata lacks {missing} (the server reads them): {dict(p)!r:.200}")
        return dict(p)

    def _score_chunk(self, images, prompts):
        metas = [self._metadata(p) for p in prompts]
        body = pickle.dumps({"images": [encode_image(im, "jpeg", self.jpeg_quality) for im in images],
                             "meta_datas": metas, "only_strict": self.only_strict}, protocol=4)
        n = len(images)

        def parse(raw):
            try:
                reply = pickle.loads(raw)  # trusted server only: see the class docstring
            except Exception as e:  # noqa: BLE001 - any undecodable body is a malformed reply
                raise _Malformed(f"cannot unpickle ({type(e).__name__}: {e}): {_snippet(raw, 120)}") from None
            if not isinstance(reply, dict):
                raise _Malformed(f"expected a dict, got {type(reply).__name__}")
            missing = [k for k in ("scores", "strict_rewards") if k not in reply]
            if missing:
                raise _Malformed(f"missing keys {missing} (keys: {sorted(map(str, reply))[:10]})")
            scores = _as_scores(reply["scores"], n, "'scores'", allow_nan=self.allow_nan)
            metrics = {"accuracy": _as_scores(reply["strict_rewards"], n, "'strict_rewards'", allow_nan=True)}
            if not self.only_strict and "rewards" in reply:
                metrics["geneval_accuracy"] = _as_scores(reply["rewards"], n, "'rewards'", allow_nan=True)
            groups = [("group_strict_rewards", "accuracy_")]
            if not self.only_strict:
                groups.append(("group_rewards", "geneval_accuracy_"))
            for key, prefix in groups:
                table = reply.get(key) or {}
                if not isinstance(table, Mapping):
                    raise _Malformed(f"'{key}' is not a dict of per-tag lists")
                for tag, values in table.items():
                    v = _as_scores(values, n, f"'{key}'[{tag!r}]", allow_nan=True)
                    metrics[f"{prefix}{tag}"] = np.where(v <= -10.0, np.nan, v).astype(np.float32)
            return scores, metrics

        return self._post(body, "application/octet-stream", parse)


# ----------------------------------------------------------------------------- Python callbacks

class CallbackReward(HostReward):
    """Any Python scorer as a reward: `fn(images float32 [B, H, W, 3] in [0, 1], prompts list)`.

    `fn` returns scores [B] (any array-like), or `(scores, {metric: [B]})`, or a dict with a
    "scores" key and more per-sample entries (kept as metrics). Exceptions from `fn` propagate.
    With `batch_size`, `fn` sees chunks of at most that many images, in order.
    """

    _uint8 = False

    def __init__(self, fn: Callable, *, batch_size: int | None = None, allow_nan: bool = False,
                 concurrency: int = 1):
        if not callable(fn):
            raise TypeError(f"CallbackReward needs a callable, got {type(fn).__name__}")
        super().__init__(batch_size=batch_size, concurrency=concurrency)
        self.fn, self.allow_nan = fn, bool(allow_nan)

    def _score_chunk(self, images, prompts):
        out = self.fn(images, list(prompts))
        metrics = {}
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            out, metrics = out
        elif isinstance(out, Mapping):
            if "scores" not in out:
                raise ValueError(f"{_name(self.fn)} returned a dict without 'scores' (keys {sorted(out)[:10]})")
            metrics = {k: v for k, v in out.items() if k != "scores"}
            out = out["scores"]
        n = len(images)
        scores = np.asarray(out, dtype=np.float32)
        if scores.shape != (n,):
            raise ValueError(f"{_name(self.fn)} returned scores of shape {scores.shape} for {n} images; "
                             f"a reward returns one score per image, shape ({n},)")
        if not self.allow_nan and not np.all(np.isfinite(scores)):
            raise ValueError(f"{_name(self.fn)} returned non-finite scores at "
                             f"{np.flatnonzero(~np.isfinite(scores)).tolist()[:8]} (allow_nan=True accepts them)")
        metrics = {k: m for k, v in metrics.items() if (m := _as_metric(np.asarray(v).reshape(-1).tolist(), n)) is not None}
        return scores, metrics


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# ----------------------------------------------------------------------------- JAX bridge

def _lookup_fn(prompts) -> Callable[[np.ndarray], list]:
    if callable(prompts) and not isinstance(prompts, (Sequence, np.ndarray)):
        return lambda ids: list(prompts(ids))
    table = list(prompts)

    def lookup(ids):
        bad = [int(i) for i in ids if not 0 <= int(i) < len(table)]
        if bad:
            raise IndexError(f"prompt ids {bad[:8]} are outside the table of {len(table)} prompts")
        return [table[int(i)] for i in ids]

    return lookup


def host_score(reward, images, prompts):
    # Jittable rewards have score(params, pixels, tokens); on the host they are called as reward(images, prompts).
    if hasattr(reward, "score") and callable(reward.score) and not getattr(reward, "jittable", False):
        return reward.score(images, prompts)
    scores = reward(images, prompts)
    return scores, dict(getattr(reward, "metrics", {}) or {})


def as_jax(reward, prompts, *, metrics: Sequence[str] = (), sharding=None):
    """A jittable `fn(images [..., B, H, W, 3], prompt_ids [..., B] int) -> scores [..., B] float32`.

    `reward` is a host reward (anything with `score(images, prompts) -> (scores, metrics)`, or a
    plain `reward(images, prompts) -> scores`); `prompts` is the prompt table (a sequence indexed
    by prompt id, of strings or metadata dicts) or a function `ids -> prompts`. With `metrics`
    (names of the reward's per-sample metrics, e.g. ("accuracy",)) `fn` returns
    `{"reward": scores, name: values, ...}`; a metric the reward did not produce is NaN.

    The call goes through `jax.pure_callback` (vmap_method="broadcast_all": under vmap the host sees
    one flattened batch). Under jit with a batch sharded over devices, XLA gathers the batch to one
    device (in multi-process runs: on the process owning it) and makes a single host call (one set
    of server requests per step); the result comes back replicated, and XLA may log an
    "Involuntary full rematerialization" warning for the gather. With `sharding` (a NamedSharding whose first spec entry names the batch axes,
    e.g. the trainer's batch sharding) the call is instead made per shard inside `jax.shard_map`:
    each device (and in multi-process runs each host) scores its own rows, calls running
    concurrently. An exception in the reward (e.g. RewardServerError) fails the computation with a
    JaxRuntimeError whose message carries the original exception; it never becomes NaN.
    """
    import jax
    import jax.numpy as jnp

    metric_names = tuple(metrics)
    lookup = _lookup_fn(prompts)

    def host_fn(images, ids):
        ids = np.asarray(ids)
        flat_images = np.asarray(images, np.float32).reshape((-1,) + images.shape[-3:])
        scores, found = host_score(reward, flat_images, lookup(ids.reshape(-1)))
        scores = np.asarray(scores, np.float32)
        if scores.shape != (ids.size,):
            raise ValueError(f"{type(reward).__name__} returned scores of shape {scores.shape} for {ids.size} images")
        outs = [scores]
        for name in metric_names:
            value = found.get(name)
            outs.append(np.full(ids.size, np.nan, np.float32) if value is None
                        else np.asarray(value, np.float32).reshape(ids.size))
        return tuple(o.reshape(ids.shape) for o in outs)

    def call(images, ids):
        shape = jax.ShapeDtypeStruct(ids.shape, jnp.float32)
        return jax.pure_callback(host_fn, (shape,) * (1 + len(metric_names)), images, ids,
                                 vmap_method="broadcast_all")

    if sharding is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P

        spec = getattr(sharding, "spec", None)
        mesh = getattr(sharding, "mesh", None)
        if spec is None or mesh is None:
            raise TypeError(f"sharding must be a jax.sharding.NamedSharding, got {type(sharding).__name__}")
        batch = spec[0] if len(spec) else None
        mapped = jax.shard_map(call, mesh=mesh, in_specs=(P(batch), P(batch)),
                               out_specs=(P(batch),) * (1 + len(metric_names)))
        place = lambda x: jax.device_put(x, NamedSharding(mesh, P(batch)))  # explicit-axis meshes need it
        run = lambda images, ids: mapped(place(images), place(ids))
    else:
        run = call

    def fn(images, prompt_ids):
        images, ids = jnp.asarray(images), jnp.asarray(prompt_ids)
        if images.ndim < 4 or images.shape[-1] != 3 or images.shape[:-3] != ids.shape:
            raise ValueError(f"expected images [..., B, H, W, 3] and prompt_ids [..., B]; got {images.shape} "
                             f"and {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"prompt_ids must be integers (indices into the prompt table), got {ids.dtype}")
        out = run(images.astype(jnp.float32), ids.astype(jnp.int32))
        if not metric_names:
            return out[0]
        return {"reward": out[0], **dict(zip(metric_names, out[1:]))}

    return fn


def host_reward(reward, images, prompt_ids, lookup, *, metrics: Sequence[str] = (), sharding=None):
    """`as_jax(reward, lookup, ...)(images, prompt_ids)`: a host reward inside a jitted function."""
    return as_jax(reward, lookup, metrics=metrics, sharding=sharding)(images, prompt_ids)
