"""Parsing vLLM and SGLang Prometheus exposition text."""

from __future__ import annotations

from kvrouter.load.prometheus import Sample, iter_samples, parse_engine_metrics

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CACHE_INFO = (
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
    'gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27000",'
    'num_gpu_blocks_override="None"} 1.0'
)

VLLM_TEXT = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 14011.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} 12000.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{{engine="0",model_name="{MODEL}"}} 1.7318e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="{MODEL}"}} 3000.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
{CACHE_INFO}
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.001",model_name="{MODEL}"}} 0.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} 41.0
vllm:time_to_first_token_seconds_count{{engine="0",model_name="{MODEL}"}} 41.0
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="{MODEL}"}} 3.2
"""

SGLANG_TEXT = f"""\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"}} 5.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{{engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"}} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{{engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"}} 0.28
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{{engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"}} 0.61
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{{engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"}} 812.3
"""


def test_vllm_page() -> None:
    snap = parse_engine_metrics(VLLM_TEXT)
    assert snap.engine == "vllm"
    assert snap.num_requests_running == 3
    assert snap.num_requests_waiting == 2
    assert snap.kv_usage == 0.5
    assert snap.kv_total_blocks == 27000
    assert snap.prefix_cache_queries == 12000.0
    assert snap.prefix_cache_hits == 3000.0
    assert snap.cache_hit_rate is None
    assert snap.num_malformed == 0
    assert snap.num_samples == 12


def test_vllm_engine_cores_sum_counts_and_average_usage() -> None:
    text = """\
vllm:num_requests_running{engine="0"} 3
vllm:num_requests_running{engine="1"} 4
vllm:num_requests_waiting{engine="0"} 1
vllm:num_requests_waiting{engine="1"} 0
vllm:kv_cache_usage_perc{engine="0"} 0.25
vllm:kv_cache_usage_perc{engine="1"} 0.75
vllm:prefix_cache_queries_total{engine="0"} 100
vllm:prefix_cache_queries_total{engine="1"} 300
vllm:prefix_cache_hits_total{engine="0"} 10
vllm:prefix_cache_hits_total{engine="1"} 30
"""
    snap = parse_engine_metrics(text)
    assert (snap.num_requests_running, snap.num_requests_waiting) == (7, 1)
    assert snap.kv_usage == 0.5
    assert (snap.prefix_cache_queries, snap.prefix_cache_hits) == (400.0, 40.0)
    assert snap.kv_total_blocks is None
    # Each data-parallel rank of the server reads its own engine's series.
    info = 'vllm:cache_config_info{engine="%d",num_gpu_blocks="%d"} 1\n'
    text += info % (0, 1000) + info % (1, 3000)
    rank1 = parse_engine_metrics(text, dp_rank=1)
    assert (rank1.num_requests_running, rank1.num_requests_waiting) == (4, 0)
    assert rank1.kv_usage == 0.75
    assert (rank1.prefix_cache_queries, rank1.prefix_cache_hits, rank1.kv_total_blocks) == (
        300.0,
        30.0,
        3000,
    )
    assert parse_engine_metrics(text, dp_rank=0).num_requests_running == 3
    # A page of one engine is that engine's, whichever rank asks.
    single = "vllm:num_requests_running 5\nvllm:num_requests_waiting 2\n"
    assert parse_engine_metrics(single, dp_rank=3).num_requests_running == 5


def test_older_vllm_usage_name() -> None:
    text = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.125\nvllm:num_requests_running 1\n'
    snap = parse_engine_metrics(text)
    assert snap.engine == "vllm"
    assert snap.kv_usage == 0.125
    assert snap.num_requests_running == 1
    assert snap.num_requests_waiting is None


def test_sglang_page() -> None:
    snap = parse_engine_metrics(SGLANG_TEXT)
    assert snap.engine == "sglang"
    assert snap.num_requests_running == 5
    assert snap.num_requests_waiting == 1
    assert snap.kv_usage == 0.28
    assert snap.cache_hit_rate == 0.61
    assert snap.prefix_cache_queries is None
    assert snap.num_malformed == 0


def test_malformed_lines_are_skipped_and_counted() -> None:
    text = """\
vllm:num_requests_running{model_name="m" 3.0
vllm:num_requests_waiting abc
this is not a metric
vllm:num_requests_waiting{model_name="m"} 4
vllm:kv_cache_usage_perc{model_name="m",bad label="x"} 0.9
vllm:kv_cache_usage_perc{model_name="m"} 0.3
"""
    snap = parse_engine_metrics(text)
    assert snap.num_malformed == 4
    assert snap.num_samples == 2
    assert snap.num_requests_running is None
    assert snap.num_requests_waiting == 4
    assert snap.kv_usage == 0.3


def test_quoted_label_values_timestamps_and_special_values() -> None:
    text = (
        'vllm:num_requests_running{model_name="a,b}\\"c"} 4 1700000000000\n'
        "vllm:num_requests_waiting NaN\n"
        "vllm:kv_cache_usage_perc +Inf\n"
    )
    samples = list(iter_samples(text))
    assert samples[0] == Sample("vllm:num_requests_running", (("model_name", 'a,b}\\"c'),), 4.0)
    snap = parse_engine_metrics(text)
    assert snap.num_requests_running == 4
    assert snap.num_requests_waiting is None  # NaN carries no information
    assert snap.kv_usage == 1.0  # clamped to a fraction


def test_unknown_page() -> None:
    snap = parse_engine_metrics("# just comments\nprocess_cpu_seconds_total 12.5\n\n")
    assert snap.engine is None
    assert (snap.num_samples, snap.num_malformed) == (1, 0)


def test_infinite_and_negative_values_are_not_counts() -> None:
    text = """\
vllm:num_requests_running{model_name="m"} +Inf
vllm:num_requests_waiting{model_name="m"} -3
vllm:kv_cache_usage_perc{model_name="m"} 0.5
vllm:prefix_cache_queries_total{model_name="m"} +Inf
vllm:prefix_cache_hits_total{model_name="m"} 10
"""
    snap = parse_engine_metrics(text)
    assert snap.num_requests_running is None  # its only sample was not finite
    assert snap.num_requests_waiting == 0
    assert snap.kv_usage == 0.5
    assert snap.prefix_cache_queries is None and snap.prefix_cache_hits == 10.0


def test_one_engine_with_an_unlabelled_series_is_read_whole_for_any_rank() -> None:
    text = """\
vllm:num_requests_running{engine="0"} 2
vllm:kv_cache_usage_perc{engine="0"} 0.25
vllm:cache_config_info{num_gpu_blocks="100"} 1
"""
    snap = parse_engine_metrics(text, dp_rank=1)
    assert (snap.num_requests_running, snap.kv_usage, snap.kv_total_blocks) == (2, 0.25, 100)
