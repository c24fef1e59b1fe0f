"""PYTORCH_CUDA_ALLOC_CONF, parsed as torch 2.15's allocator parses it.

Sources: c10/core/AllocatorConfig.{h,cpp} (AcceleratorAllocatorConfig: ConfigTokenizer, parseArgs and one
parse function per key) and c10/cuda/CUDAAllocatorConfig.h (the CUDA-only keys). The header of the installed
torch 2.15 (torch/include/c10/core/AllocatorConfig.h) carries the constants and the defaults used here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memtui.engine.errors import InputError

MB = 1 << 20
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: every size is rounded up to a multiple of 512 bytes


def block_rounded(n_bytes: int) -> int:
    """The bytes of a tensor of `n_bytes` as the caching allocator rounds it (a block's least size, 512)."""
    return max(K_MIN_BLOCK_SIZE, (n_bytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE * K_MIN_BLOCK_SIZE) if n_bytes else 0
K_SMALL_SIZE = 1 << 20  # kSmallSize: the largest request served by the small pool (1 MiB)
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segments are 2 MiB
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: requests under 10 MiB share a large_segment_size segment
K_ROUND_LARGE = 2 << 20  # kRoundLarge: larger segments are rounded up to 2 MiB
K_LARGE_BUFFER = 20 << 20  # AcceleratorAllocatorConfig::large_segment_size_ default (kLargeBuffer)
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB, one slot per power of two
_SIZE_T_MAX = (1 << 64) - 1

CONF_FLAG = "--alloc-conf"

# Keys torch accepts and that change nothing this model replays (host/pinned memory, locking, IPC).
_IGNORED_KEYS = frozenset({
    "pinned_use_background_threads", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
    "release_lock_on_hipmalloc", "pinned_use_hip_host_register", "graph_capture_record_stream_reuse",
    "pinned_reserve_segment_size_mb", "pinned_num_register_threads", "pinned_free_catch_all",
    "throw_on_cudamalloc_oom", "expandable_segments_reserve", "expandable_segments_reserve_by_class",
    "pinned_max_round_threshold", "pinned_max_cached_size",
})
_MODELLED_KEYS = ("backend", "large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
                  "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
                  "per_process_memory_fraction")
KNOWN_KEYS = tuple(_MODELLED_KEYS) + tuple(sorted(_IGNORED_KEYS))


@dataclass(frozen=True)
class AllocatorConfig:
    """The settings the caching allocator's decisions depend on, in bytes."""

    max_split_size: int | None = None  # None: unlimited (std::numeric_limits<size_t>::max())
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    large_segment_size: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    per_process_memory_fraction: float | None = None  # set: setMemoryFraction, which also arms the GC
    text: str = ""

    @property
    def split_limit(self) -> int:
        return _SIZE_T_MAX if self.max_split_size is None else self.max_split_size

    def divisions_for(self, size: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): the slot of size's power of two."""
        log_size = size.bit_length() - 1
        index = max(0, log_size - 20)  # interval_start = log2(1 MiB)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]


DEFAULT_CONFIG = AllocatorConfig()


def _tokens(text: str) -> list[str]:
    """ConfigTokenizer: ',', ':', '[' and ']' are tokens of their own; whitespace is dropped."""
    tokens: list[str] = []
    buffer = ""
    for char in text:
        if char in ",:[]":
            if buffer:
                tokens.append(buffer)
                buffer = ""
            tokens.append(char)
        elif not char.isspace():
            buffer += char
    if buffer:
        tokens.append(buffer)
    return tokens


def _bad(key: str, value: str, allowed: str) -> InputError:
    return InputError(CONF_FLAG, f"{key}: {value!r} is not valid", allowed)


class _Reader:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def at(self, i: int, key: str) -> str:
        if i >= len(self.tokens):
            raise InputError(CONF_FLAG, f"{key}: missing value", "key:value pairs separated by commas")
        return self.tokens[i]

    def colon(self, i: int, key: str) -> None:
        if self.at(i, key) != ":":
            raise InputError(CONF_FLAG, f"{key}: expected ':' after the key", "key:value pairs separated by commas")

    def size(self, i: int, key: str, allowed: str) -> int:
        token = self.at(i, key)
        if not token.isdigit():
            raise _bad(key, token, allowed)
        return int(token)

    def number(self, i: int, key: str, valid, allowed: str) -> float:
        """The float value of `key` (at i), checked by `valid`."""
        self.colon(i + 1, key)
        token = self.at(i + 2, key)
        try:
            value = float(token)
        except ValueError:
            raise _bad(key, token, allowed) from None
        if not valid(value):
            raise _bad(key, token, allowed)
        return value

    def boolean(self, i: int, key: str) -> bool:
        token = self.at(i, key)
        if token not in ("True", "False"):
            raise _bad(key, token, "True, False")
        return token == "True"

    def skip(self, i: int, key: str) -> int:
        """ConfigTokenizer::skipKey: past the value, a single token or a bracketed list."""
        self.colon(i + 1, key)
        i += 2
        if self.at(i, key) != "[":
            return i
        while i + 1 < len(self.tokens) and self.tokens[i + 1] != "]":
            i += 1
        if i + 1 >= len(self.tokens):
            raise InputError(CONF_FLAG, f"{key}: list without a closing ']'", "key:[a:b,c:d]")
        return i + 1


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """AcceleratorAllocatorConfig::parseArgs + CUDAAllocatorConfig::parseArgs, minus side effects."""
    if not text or not text.strip():
        return DEFAULT_CONFIG
    tokens = _tokens(text)
    reader = _Reader(tokens)
    settings: dict = {"text": text}

    # parseArgs reads large_segment_size_mb first: max_non_split_rounding_size defaults to it and
    # max_split_size_mb and max_non_split_rounding_mb must not be below it.
    large_segment = K_LARGE_BUFFER
    i = 0
    while i < len(tokens):
        if tokens[i] == "large_segment_size_mb":
            reader.colon(i + 1, tokens[i])
            allowed = f"an integer number of MiB > {K_MIN_LARGE_ALLOC // MB}"
            value = reader.size(i + 2, "large_segment_size_mb", allowed)
            if value <= K_MIN_LARGE_ALLOC // MB:  # parseLargeSegmentSize: val_env > kMinLargeAlloc / kMB
                raise _bad("large_segment_size_mb", str(value), allowed)
            large_segment = value * MB
            i += 2
        i += 1
    settings["large_segment_size"] = large_segment
    settings["max_non_split_rounding_size"] = large_segment

    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key in (",",):
            i += 1
            continue
        if key == "large_segment_size_mb":
            i = reader.skip(i, key)
        elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            reader.colon(i + 1, key)
            floor_mb = large_segment // MB
            allowed = f"an integer number of MiB >= {floor_mb}"
            value = reader.size(i + 2, key, allowed)
            if value < floor_mb:  # parseMaxSplitSize / parseMaxNonSplitRoundingSize: val_env >= large_segment_size_ / kMB
                raise _bad(key, str(value), allowed)
            value = min(value, _SIZE_T_MAX // MB) * MB
            settings["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"] = value
            i += 2
        elif key == "garbage_collection_threshold":  # parseGarbageCollectionThreshold: in (0.0, 1.0)
            settings[key] = reader.number(i, key, lambda v: 0.0 < v < 1.0, "a number in (0.0, 1.0)")
            i += 2
        elif key == "roundup_power2_divisions":
            i = _parse_divisions(reader, i, settings)
        elif key == "expandable_segments":
            reader.colon(i + 1, key)
            settings["expandable_segments"] = reader.boolean(i + 2, key)
            i += 2
        elif key == "per_process_memory_fraction":
            settings[key] = reader.number(i, key, lambda v: 0.0 <= v <= 1.0, "a number in [0.0, 1.0]")
            i += 2
        elif key == "backend":
            reader.colon(i + 1, key)
            token = reader.at(i + 2, key)
            if token != "native":
                if token == "cudaMallocAsync":
                    raise InputError(CONF_FLAG, "backend:cudaMallocAsync is CUDA's own stream-ordered allocator, "
                                     "which this model does not replay", "native")
                raise _bad(key, token, "native, cudaMallocAsync")
            i += 2
        elif key in _IGNORED_KEYS:
            i = reader.skip(i, key)
        else:
            raise InputError(CONF_FLAG, f"unknown key {key!r}", ", ".join(KNOWN_KEYS))
        i += 1
        if i < len(tokens):
            if tokens[i] != ",":
                raise InputError(CONF_FLAG, f"expected ',' after {key}", "key:value pairs separated by commas")
            i += 1
    return replace(DEFAULT_CONFIG, **settings)


def _parse_divisions(reader: _Reader, i: int, settings: dict) -> int:
    """parseRoundUpPower2Divisions: one power of two for every size, or [MiB:divisions,...,>:divisions]."""
    key = "roundup_power2_divisions"
    reader.colon(i + 1, key)
    i += 2
    divisions = [0] * ROUNDUP_INTERVALS
    allowed_value = "a power of two (or 0 inside a list)"
    if reader.at(i, key) != "[":
        value = reader.size(i, key, allowed_value)
        if not _is_power_of_two(value):
            raise _bad(key, str(value), allowed_value)
        settings["roundup_power2_divisions"] = (value,) * ROUNDUP_INTERVALS
        return i
    first_value = True
    last_index = 0
    while True:
        i += 1
        token = reader.at(i, key)
        if token == "]":
            break
        boundary_token = token
        reader.colon(i + 1, key)
        value = reader.size(i + 2, key, allowed_value)
        i += 2
        if value != 0 and not _is_power_of_two(value):
            raise _bad(key, str(value), allowed_value)
        if boundary_token == ">":
            for slot in range(last_index + 1, ROUNDUP_INTERVALS):
                divisions[slot] = value
        else:
            allowed_boundary = "a power of two number of MiB, or '>'"
            if not boundary_token.isdigit() or not _is_power_of_two(int(boundary_token)):
                raise _bad(key, boundary_token, allowed_boundary)
            index = min(int(boundary_token).bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first_value:
                for slot in range(index):
                    divisions[slot] = value
                first_value = False
            divisions[index] = value
            last_index = index
        following = reader.at(i + 1, key)
        if following != "]":
            if following != ",":
                raise _bad(key, following, "[MiB:divisions,...,>:divisions]")
            i += 1
    settings["roundup_power2_divisions"] = tuple(divisions)
    return i
