"""The DeepSpeed config a ZeRO-3 stage runs with: the stage's batch, accumulation and clipping, the user's ZeRO
settings kept, "auto" sizes filled, and other ZeRO stages refused. (Training under ZeRO-3 — the weights of one process,
resume from partitions, bf16 autocast — is tested with the other engines in test_distributed.py.)"""

import pytest
import yaml

from ling_surgery.surgery.config import LogitDistillStage
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.recipes import recipes_dir
from ling_surgery.surgery.zero3 import engine_config


def test_the_stage_sets_batch_accumulation_and_clipping_and_the_user_tunes_zero():
    stage = LogitDistillStage(batch_size=8, grad_accumulation=4, max_grad_norm=0.5)
    user = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": 1000},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "gradient_clipping": "auto", "communication_data_type": "fp32"}
    config = engine_config(user, stage, rows=2, processes=4, layer_numel=123)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 4, 2 * 4 * 4, 0.5)
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["stage3_prefetch_bucket_size"] == 1000
    assert zero["reduce_bucket_size"] == 123 and zero["stage3_max_live_parameters"] == 246
    assert "bf16" not in config  # precision is runtime.dtype's: bf16 autocast over fp32 weights
    assert config["communication_data_type"] == "fp32"
    assert engine_config(None, stage, 2, 4, 123)["zero_optimization"]["stage"] == 3


def test_another_zero_stage_is_refused():
    with pytest.raises(SurgeryError, match="ZeRO stage 2: runtime.engine zero3 runs stage 3"):
        engine_config({"zero_optimization": {"stage": 2}}, LogitDistillStage(), 1, 2, 10)


def test_the_shipped_accelerate_config_is_zero3():
    shipped = yaml.safe_load((recipes_dir() / "accelerate" / "zero3.yaml").read_text())
    assert shipped["distributed_type"] == "DEEPSPEED" and shipped["deepspeed_config"]["zero_stage"] == 3
