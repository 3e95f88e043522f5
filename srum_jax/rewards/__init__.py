"""SRUM rewards: the texts (system prompts, judge prompts, rubrics), answer parsers, reward records
and dense reward maps (docs/bagel.md)."""
from srum_jax.rewards.parsing import (ParseStats, RegionAnswer, parse_global_answer,
                                      parse_global_score, parse_region_answers, parse_region_scores,
                                      strip_think)
from srum_jax.rewards.texts import Texts, load_texts, own_texts, render_global, render_regions
from srum_jax.rewards.records import (
    GLOBAL_OBJECT, SCHEMA_VERSION, ArrayStats, FilterReport, ReadReport, RegionReward, RewardRecord,
    append_record, formatting_filter, from_official, read_official_records, read_records,
    records_to_arrays, to_official, write_official_records, write_records)
from srum_jax.rewards.reward_map import resize_reward_map, reward_map, token_rewards
