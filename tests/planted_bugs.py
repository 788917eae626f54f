"""Planted bugs: small mistakes a reviewer plants one at a time, each with the tests that must catch it.

    python tests/planted_bugs.py                      # every plant (about 10 minutes on 2 idle cores)
    python tests/planted_bugs.py --only lr_ --list    # the plants whose name contains "lr_", without running them
    python tests/planted_bugs.py --tree /tmp/main-tree --whole_files   # the same bugs in main (git archive main)

Each plant replaces one exact snippet of one file in a scratch copy of the working tree (`git ls-files`, as it is on
disk), runs the plant's tests there (`pytest -x`) and reports CAUGHT (a test failed) or SURVIVED (all passed); a
snippet that no longer matches the code is reported as STALE, so the list follows the code. The exit status is 1 when
a plant survived or went stale. Mutation testing (mutmut) covers the library modules mutant by mutant
(docs/testing.md); these plants cover what mutmut cannot reach cheaply: the scripts' wiring, checked by end-to-end and
multi-process tests.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from mutation_score import copy_tree  # the same scratch copy as the mutation runs

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
# With --whole_files on a tree that lacks a plant's test file: the test file of the planted code (by path prefix).
TEST_FILE_OF_CODE = {
    "run_scripts/run_mae.py": "tests/test_training.py", "modeling_mae/training/": "tests/test_training.py",
    "modeling_mae/loops/pretraining": "tests/test_training.py",
    "modeling_mae/loops/finetuning": "tests/test_evaluation.py",
    "modeling_mae/loops/knn": "tests/test_evaluation.py", "modeling_mae/loops/linear_probe": "tests/test_evaluation.py",
    "run_scripts/run_finetune.py": "tests/test_evaluation.py", "run_scripts/run_knn.py": "tests/test_evaluation.py",
    "run_scripts/run_linear_probe.py": "tests/test_evaluation.py",
    "modeling_mae/evaluation/": "tests/test_evaluation.py",
    "modeling_mae/data/": "tests/test_data.py", "modeling_mae/studies/benchmark": "tests/test_benchmark.py",
}


@dataclass(frozen=True)
class Plant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids, or a file and -k


T = "tests/test_training.py::"
D = "tests/test_distributed.py::"
C = "tests/test_checkpoint_faults.py::"
E = "tests/test_evaluation.py::"
F = "tests/test_recipe_flags.py::"
B = "tests/test_benchmark.py::"
LR_TEST = (T + "test_the_applied_learning_rate_is_the_papers_schedule",)
MAE_FLAGS = (F + "test_pretraining_flags_reach_the_optimizer_schedule_and_model",)
FINETUNE_FLAGS = (F + "test_finetune_flags_reach_the_classifier_optimizer_and_schedule",)
MIXING = (F + "test_finetune_mixing_flags_reach_the_mixer", F + "test_finetune_defaults_are_the_papers_recipe")
PROBE_FLAGS = (F + "test_linear_probe_flags_reach_its_optimizer_and_schedule",)
KNN_FLAGS = (F + "test_knn_flags_reach_the_vote",)
KNN_ANSWER = (E + "test_knn_script_from_pretrained_and_random_init",)
PROBE_ANSWER = (E + "test_linear_probe_script",)
FINETUNE_ANSWER = (E + "test_finetune_script_saves_a_loadable_classifier",)

PLANTS = (
    # ------------------------------------------------------------------------------ the learning rate the loop applies
    Plant("lr_reference_batch_512", "modeling_mae/training/optimization.py",
          "LR_REFERENCE_BATCH = 256", "LR_REFERENCE_BATCH = 512",
          LR_TEST),
    Plant("lr_scheduler_stepped_twice", "modeling_mae/loops/pretraining.py", "            trainer.scheduler.step()\n",
          "            trainer.scheduler.step()\n            trainer.scheduler.step()\n", LR_TEST),
    Plant("lr_warmup_off_by_one", "modeling_mae/training/optimization.py", "return step / self.warmup_steps",
          "return (step + 1) / self.warmup_steps", LR_TEST),
    Plant("lr_scheduler_per_micro_batch", "modeling_mae/loops/pretraining.py",
          "        poisoned |= not train_micro_batch(trainer, progress, batch, loop)\n",
          "        poisoned |= not train_micro_batch(trainer, progress, batch, loop)\n"
          "        if not accelerator.sync_gradients:\n            trainer.scheduler.step()\n", LR_TEST),
    Plant("lr_logged_after_the_scheduler_moved", "modeling_mae/loops/pretraining.py",
          "            after_step(trainer, progress, loop, learning_rate)",
          "            after_step(trainer, progress, loop, trainer.scheduler.get_last_lr()[0])", LR_TEST),
    Plant("lr_batch_without_processes", "modeling_mae/training/accelerator.py",
          "self.gradient_accumulation_steps, self.num_processes)", "self.gradient_accumulation_steps, 1)",
          (D + "test_two_ddp_processes_match_one_process_with_the_same_global_batch",)),
    # ------------------------------------------------------------------------------------ flags that reach their object
    Plant("mae_mask_ratio_flag_dropped", "modeling_mae/loops/pretraining_setup.py",
          'for name in ("mask_ratio", "norm_pix_loss")}',
          'for name in ("norm_pix_loss",)}', MAE_FLAGS),
    Plant("mae_betas_swapped", "modeling_mae/loops/pretraining_setup.py",
          "(args.optim.adam_beta1, args.optim.adam_beta2),",
          "(args.optim.adam_beta2, args.optim.adam_beta1),", MAE_FLAGS),
    Plant("mae_adam_epsilon_dropped", "modeling_mae/loops/pretraining_setup.py",
          "        args.optim.adam_epsilon,\n    )", "    )",
          MAE_FLAGS),
    Plant("mae_min_lr_dropped", "modeling_mae/loops/pretraining_setup.py",
          "plan.total_steps, learning_rate, args.optim.min_lr)",
          "plan.total_steps, learning_rate)", MAE_FLAGS),
    Plant("mae_max_grad_norm_ignored", "modeling_mae/loops/pretraining.py",
          "    if trainer.args.optim.max_grad_norm is not None:",
          "    if False:", MAE_FLAGS),
    Plant("finetune_layer_decay_dropped", "modeling_mae/loops/finetuning_setup.py",
          "        lr_scale_fn=layer_decay_lr_scale_fn(model.config.num_hidden_layers, args.model.layer_decay),\n", "",
          FINETUNE_FLAGS),
    Plant("finetune_no_weight_decay_list_dropped", "modeling_mae/loops/finetuning_setup.py",
          "        no_weight_decay=FINETUNE_NO_WEIGHT_DECAY,\n", "", FINETUNE_FLAGS),
    Plant("finetune_drop_path_flag_ignored", "modeling_mae/loops/finetuning_setup.py",
          '"drop_path_rate": model_args.drop_path_rate,', '"drop_path_rate": 0.1,', FINETUNE_FLAGS),
    Plant("finetune_global_pool_ignored", "modeling_mae/loops/finetuning_setup.py",
          '"use_mean_pooling": model_args.global_pool,', '"use_mean_pooling": True,', FINETUNE_FLAGS),
    Plant("finetune_position_table_always_trained", "modeling_mae/loops/finetuning_setup.py",
          "requires_grad_(model_args.train_position_embeddings)", "requires_grad_(True)", FINETUNE_FLAGS),
    Plant("finetune_min_lr_dropped", "modeling_mae/loops/finetuning_setup.py",
          "plan.total_steps, learning_rate, optim.min_lr)", "plan.total_steps, learning_rate)", FINETUNE_FLAGS),
    Plant("finetune_label_smoothing_dropped", "modeling_mae/loops/finetuning_setup.py",
          "args.augment.mixup, args.augment.cutmix, args.augment.label_smoothing)",
          "args.augment.mixup, args.augment.cutmix)", MIXING),
    Plant("finetune_mixup_cutmix_swapped", "modeling_mae/loops/finetuning_setup.py",
          "args.augment.mixup, args.augment.cutmix, args.augment.label_smoothing)",
          "args.augment.cutmix, args.augment.mixup, args.augment.label_smoothing)", MIXING),
    Plant("finetune_learning_rate_flag_ignored", "modeling_mae/loops/finetuning_setup.py",
          "learning_rate = optim.learning_rate or scaled_learning_rate(", "learning_rate = scaled_learning_rate(",
          (F + "test_finetune_mixing_flags_reach_the_mixer",)),
    Plant("linprobe_lars_weight_decay_dropped", "modeling_mae/loops/linear_probe.py",
          "LARS(head.parameters(), lr=learning_rate, weight_decay=probe.weight_decay)",
          "LARS(head.parameters(), lr=learning_rate)", PROBE_FLAGS),
    Plant("linprobe_accumulation_not_in_the_batch", "modeling_mae/loops/linear_probe.py",
          "effective_batch_size(probe.per_device_train_batch_size, accumulation, accelerator.num_processes)",
          "effective_batch_size(probe.per_device_train_batch_size, 1, accelerator.num_processes)", PROBE_FLAGS),
    Plant("linprobe_streamed_pooling_ignored", "modeling_mae/loops/linear_probe.py",
          "streamed_batches, encoder, train_loader, probe.pooling,", 'streamed_batches, encoder, train_loader, "cls",',
          (F + "test_linear_probe_pooling_reaches_the_features",)),
    Plant("knn_temperature_not_passed", "modeling_mae/loops/knn.py", "knn_args.k, knn_args.temperature,",
          "knn_args.k,", KNN_FLAGS),
    Plant("knn_default_temperature_changed", "modeling_mae/evaluation/arguments.py",
          "default=0.07,", "default=0.1,", KNN_FLAGS),
    Plant("knn_bank_pooling_ignored", "modeling_mae/loops/knn.py", 'train_loader, knn_args.pooling, "train features")',
          'train_loader, "mean", "train features")', KNN_FLAGS),
    # --------------------------------------------------------------------- evaluations with a known right answer
    Plant("knn_temperature_ignored_in_the_vote", "modeling_mae/evaluation/knn.py",
          "weights = (similarity / temperature).exp()", "weights = similarity.exp()", KNN_ANSWER),
    Plant("knn_farthest_neighbours", "modeling_mae/evaluation/knn.py", "(query @ bank.T).topk(k, dim=-1)",
          "(query @ bank.T).topk(k, dim=-1, largest=False)", KNN_ANSWER),
    Plant("knn_labels_shuffled", "modeling_mae/loops/knn.py", "knn_scores(queries, bank, bank_labels,",
          "knn_scores(queries, bank, bank_labels.flip(0),", KNN_ANSWER),
    Plant("linprobe_labels_shuffled", "modeling_mae/loops/linear_probe.py",
          "labels[mine.to(labels.device)]", "labels[mine.flip(0).to(labels.device)]", PROBE_ANSWER),
    Plant("finetune_labels_shuffled", "modeling_mae/loops/finetuning.py",
          'loop.mixer(batch["pixel_values"], batch["labels"])',
          'loop.mixer(batch["pixel_values"], batch["labels"].roll(1))',
          FINETUNE_ANSWER),
    # --------------------------------------------------------------------- checks that passed with the feature off
    Plant("resume_without_the_weights", "modeling_mae/training/resume.py",
          "    with weights_only_loading(allowed), refusing_another_model(checkpoint):\n"
          "        accelerator.load_state(str(checkpoint))\n", "",
          (T + "test_sigkill_then_resume_latest",)),
    Plant("skipped_images_overwritten", "modeling_mae/data/loader.py", "self._skipped += len(bad_keys)",
          "self._skipped = len(bad_keys)", (T + "test_bad_images_are_skipped_and_counted_in_the_results",)),
    Plant("skipped_images_not_reported", "modeling_mae/loops/pretraining_outputs.py",
          '"skipped_images": int(skipped.item()),',
          '"skipped_images": 0,', (T + "test_bad_images_are_skipped_and_counted_in_the_results",)),
    Plant("skipped_images_of_one_process", "modeling_mae/loops/pretraining_outputs.py",
          'skipped = trainer.accelerator.reduce(skipped, reduction="sum") if',
          "skipped = skipped if", (D + "test_deepspeed_zero_trains_checkpoints_resumes_and_exports[2]",)),
    Plant("masks_shared_by_all_processes", "modeling_mae/loops/pretraining.py",
          "        accelerator.process_index,\n        progress.epoch,", "        0,\n        progress.epoch,",
          (T + "test_each_process_draws_its_own_masks_and_the_same_again_on_resume",)),
    Plant("deepspeed_clipping_on_by_default", "modeling_mae/training/accelerator.py",
          'config["gradient_clipping"] = max_grad_norm or 0.0', 'config["gradient_clipping"] = max_grad_norm or 1.0',
          (T + "test_deepspeed_auto_values_are_filled_without_clipping",)),
    Plant("lockstep_counts_repeated_batches", "modeling_mae/training/accelerator.py", "            yield last, False",
          "            yield last, True", (T + "test_evaluation_batches_go_in_lockstep_until_every_process_is_done",)),
    Plant("loss_summed_over_processes", "modeling_mae/training/progress.py",
          "progress.loss_sum += loss_sum / accelerator.num_processes", "progress.loss_sum += loss_sum",
          (T + "test_loss_window_averages_over_processes",)),
    Plant("loss_statistics_overwritten", "modeling_mae/training/progress.py",
          "progress.loss_sum += loss_sum / accelerator.num_processes",
          "progress.loss_sum = loss_sum / accelerator.num_processes",
          (T + "test_loss_window_averages_over_processes",)),
    Plant("rotation_deletes_the_newest", "modeling_mae/training/checkpoints.py",
          "for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:", "for old in checkpoints[total_limit:]:",
          (T + "test_the_oldest_checkpoints_are_deleted_beyond_the_limit",)),
    Plant("knn_queries_normalised_across_the_chunk", "modeling_mae/evaluation/knn.py",
          "query = F.normalize(queries[start : start + chunk_size].float(), dim=-1)",
          "query = F.normalize(queries[start : start + chunk_size].float(), dim=0)",
          (E + "test_knn_scores_are_the_weighted_vote_of_each_query_with_the_papers_defaults",)),
    Plant("probe_head_batchnorm_eps", "modeling_mae/evaluation/linear_probe.py",
          "affine=False, eps=1e-6", "affine=False, eps=1e-5",
          (E + "test_linear_probe_head_normalises_with_the_running_statistics_then_projects",)),
    Plant("load_encoder_overrides_dropped", "modeling_mae/evaluation/models.py",
          "config = load_model_config(model_name_or_path, config_overrides)",
          "config = load_model_config(model_name_or_path, None)",
          (E + "test_load_encoder_applies_config_overrides_to_pretrained_weights",)),
    Plant("resize_to_a_square_of_the_width", "modeling_mae/evaluation/models.py",
          "new_size = (int(image_size[0]), int(image_size[1]))", "new_size = (int(image_size[1]), int(image_size[1]))",
          (E + "test_resize_model_resolution_to_a_non_square_size",)),
    Plant("one_augmentation_seed_for_all", "modeling_mae/data/stream.py",
          "hash((self.seed, epoch, self.process_index, worker, position))", "hash(self.seed)",
          ("tests/test_data.py", "-k", "every_record_and_epoch_draws_its_own_crop")),
    # ------------------------------------------------------------------------------- model mutants mutmut found alive
    Plant("drop_path_scaled_by_keep", "modeling_mae/modeling_mae.py", "bernoulli_(keep) / keep",
          "bernoulli_(keep) * keep",
          ("tests/test_modeling.py::test_drop_path_drops_whole_samples_and_keeps_the_expectation",)),
    Plant("cls_position_subtracted", "modeling_mae/modeling_mae.py", "self.cls_token + self.position_embeddings[:, :1]",
          "self.cls_token - self.position_embeddings[:, :1]",
          ("tests/test_modeling.py::test_an_encoder_with_a_trained_position_table_is_transformers_vit",)),
    # ---------------------------------------------------------------------------------------------- weak assertions
    Plant("decode_crashes_on_every_input", "modeling_mae/data/fast_decode.py",
          "    image = Image.open(io.BytesIO(data))\n    if min_side is not None",
          "    image = Image.open(io.BytesIO(date))\n    if min_side is not None",
          ("tests/test_data.py", "-k", "bad_bytes_raise_on_decode")),
    Plant("benchmark_speedup_inverted", "modeling_mae/studies/benchmark.py",
          '"of_medians": statistics.median(times[slow]["wall"]) / statistics.median(times[fast]["wall"])',
          '"of_medians": statistics.median(times[fast]["wall"]) / statistics.median(times[slow]["wall"])',
          (B + "test_benchmark_runs_and_writes_json_and_markdown",)),
    Plant("mask_token_without_position", "modeling_mae/studies/benchmark.py",
          "masked = mask_token + embeddings.position_embeddings[:, 1:]",
          "masked = mask_token + 0 * embeddings.position_embeddings[:, 1:]",
          (B + "test_mask_token_baseline_is_a_vit_with_mask_tokens_and_the_vitmae_decoder",)),
    # -------------------------------------------------------------- a run's folder, what it resumes, and preemption
    Plant("output_dir_lock_not_exclusive", "modeling_mae/training/output_lock.py",
          "os.O_CREAT | os.O_EXCL | os.O_WRONLY", "os.O_CREAT | os.O_WRONLY | os.O_TRUNC",
          (C + "test_a_second_run_in_a_folder_in_use_is_refused_naming_the_first_then_takes_it_back_once_the_first_"
               "died",)),
    Plant("kept_checkpoint_logged_as_saved", "modeling_mae/training/checkpoints.py",
          """logger.info("step %d: kept %s, which already holds this run's state at that step", step, final)""",
          'logger.info("step %d: saved %s", step, final)',
          (C + "test_saving_the_step_a_run_resumed_from_keeps_that_checkpoint",)),
    Plant("resume_identity_unchecked", "modeling_mae/training/resume.py",
          "    return check_resumed_identity(identity, current, checkpoint, allow_objective_change)", "    return {}",
          (C + "test_a_resume_with_another_objective_is_refused_unless_meant_then_logged",)),
    Plant("run_config_written_before_the_resume_check", "modeling_mae/loops/pretraining_setup.py",
          "        progress = resume(trainer)  # checked before this run writes any record\n"
          "        if accelerator.is_main_process:\n"
          "            save_resolved_config(args.resolved(), trainer.output_dir / RUN_CONFIG_FILE)\n",
          "        if accelerator.is_main_process:\n"
          "            save_resolved_config(args.resolved(), trainer.output_dir / RUN_CONFIG_FILE)\n"
          "        progress = resume(trainer)\n",
          ("tests/test_checkpoint_faults.py", "-k", "other_data_or_another_model")),
    Plant("linked_checkpoint_resolved", "modeling_mae/training/resume.py",
          "os.path.realpath(resumed.parent) != os.path.realpath(output_dir)",
          "resumed.resolve().parent != output_dir.resolve()", ("tests/test_checkpoint_faults.py", "-k", "linked")),
    Plant("trainer_state_types_unchecked", "modeling_mae/training/resume.py",
          "        if not fits(state[name], types_of[name]):", "        if False:",
          ("tests/test_checkpoint_faults.py", "-k", "malformed")),
    Plant("sigterm_ignored_by_the_pretraining_loop", "modeling_mae/loops/pretraining.py",
          "            stop_if_signalled(trainer, progress, loop)\n", "",
          (C + "test_sigterm_finishes_the_step_saves_it_and_the_resumed_run_is_the_uninterrupted_one",)),
    Plant("stop_signal_not_agreed_across_processes", "modeling_mae/training/preemption.py",
          "        if accelerator.num_processes == 1:\n", "        if True:\n",
          (D + "test_sigusr1_to_a_two_process_run_saves_in_lockstep_and_the_resumed_run_is_the_uninterrupted_one",)),
    # ------------------------------------------------------------------------------------ data faults, foreign models
    Plant("empty_epoch_counted_as_an_epoch", "modeling_mae/data/loader.py",
          "if position.batches == 0 and self._must_yield:", "if False:",
          ("tests/test_data_faults.py", "-k", "all_given_up_stops_in_one_line")),
    Plant("resource_errors_blamed_on_the_shard", "modeling_mae/data/shards.py",
          "                if is_resource_error(error):\n                    raise\n", "",
          ("tests/test_data_faults.py", "-k", "resource_errors_and_bugs_pass_through")),
    Plant("foreign_model_type_accepted", "modeling_mae/configuration_mae.py",
          "        if model_type != MAEConfig.model_type:", "        if False:",
          ("tests/test_modeling.py", "-k", "refuses_the_config_of_another_model_type")),
    Plant("checkpoint_upload_waits_for_the_previous_one", "modeling_mae/interop/hub.py",
          "        pending = PendingUpload(snapshot_for_upload(folder), pathlib.Path(folder), commit_message)\n",
          "        if self._worker is not None:\n            self._worker.result()\n"
          "        pending = PendingUpload(snapshot_for_upload(folder), pathlib.Path(folder), commit_message)\n",
          ("tests/test_hub.py", "-k", "return_at_once_and_only_the_newest")),
    # ------------------------------------------- what users notice: evaluation's wiring, the records, the edge shapes
    Plant("finetune_validation_in_training_mode", "modeling_mae/loops/finetuning.py",
          "    model.eval()\n    for batch, is_real in iterate_in_lockstep(", "    for batch, is_real in iterate_in_lockstep(",
          (E + "test_finetune_validation_scores_the_model_in_eval_mode_whatever_the_eval_batch",)),
    Plant("validation_loss_mean_of_batch_means", "modeling_mae/loops/pretraining_outputs.py",
          "loss.double() * pixel_values.shape[0],\n                    torch.tensor(float(pixel_values.shape[0]),",
          "loss.double(),\n                    torch.tensor(1.0,",
          (T + "test_the_validation_loss_is_the_mean_over_images_whatever_the_eval_batch",)),
    Plant("validation_loss_of_one_process", "modeling_mae/loops/pretraining_outputs.py",
          'totals = accelerator.reduce(totals, reduction="sum") if', "totals = totals if",
          (D + "test_two_ddp_processes_match_one_process_with_the_same_global_batch",)),
    Plant("linprobe_exact_last_batch_dropped", "modeling_mae/loops/linear_probe.py",
          "range(0, features.shape[0] - global_batch + 1, global_batch)",
          "range(0, features.shape[0] - global_batch, global_batch)",
          ("tests/test_evaluation.py", "-k", "cached_batches_hold or every_batch_of_an_exact_multiple")),
    Plant("finetune_scheduler_per_micro_batch", "modeling_mae/loops/finetuning.py",
          "        if accelerator.sync_gradients:\n            loop.scheduler.step()\n",
          "        loop.scheduler.step()\n        if accelerator.sync_gradients:\n",
          (E + "test_finetune_with_accumulation_takes_the_whole_batchs_steps_and_records_them",)),
    Plant("finetune_zero_steps_accepted", "modeling_mae/evaluation/arguments.py",
          '{**OptimizationArguments.FLAG_RANGES, "max_train_steps": AT_LEAST_ONE}',
          "{**OptimizationArguments.FLAG_RANGES}", ("tests/test_evaluation.py", "-k", "refuses_zero_steps")),
    Plant("card_batch_without_accumulation", "modeling_mae/interop/model_card.py",
          "effective_batch_size(optim.per_device_train_batch_size, optim.gradient_accumulation_steps, num_processes)",
          "effective_batch_size(optim.per_device_train_batch_size, 1, num_processes)", LR_TEST),
    Plant("finetune_records_batch_without_accumulation", "modeling_mae/loops/finetuning_setup.py",
          '"effective_batch_size": loop.layout.effective_batch_size,',
          '"effective_batch_size": args.optim.per_device_train_batch_size * accelerator.num_processes,',
          (E + "test_finetune_with_accumulation_takes_the_whole_batchs_steps_and_records_them",)),
    Plant("grid_of_swapped_patch_sides", "modeling_mae/configuration_mae.py",
          "(self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])",
          "(self.image_size[0] // self.patch_size[1], self.image_size[1] // self.patch_size[0])",
          ("tests/test_modeling.py", "-k", "hand_counted_grid")),
    Plant("classifier_mean_with_the_cls_token", "modeling_mae/modeling_mae.py",
          "self.fc_norm(encoded.last_hidden_state[:, 1:].mean(dim=1))",
          "self.fc_norm(encoded.last_hidden_state.mean(dim=1))",
          ("tests/test_modeling.py", "-k", "pools_as_the_official")),
    Plant("hub_error_token_unmasked", "modeling_mae/interop/hub.py",
          'return text.replace(self._token, "***") if self._token else text', "return text",
          ("tests/test_hub.py", "-k", "quotes_the_token")),
    # Your own images (issue 22): the wiring from the data set's channels and statistics to the exported processor.
    Plant("other_channels_normalised_with_the_presets_statistics", "modeling_mae/loops/image_statistics.py",
          'return "auto" if config.num_channels != RGB_CHANNELS', 'return "config" if config.num_channels != RGB_CHANNELS',
          ("tests/test_channels.py",)),
    Plant("sixteen_bit_processor_rescales_by_255", "modeling_mae/loops/image_statistics.py",
          'return {**chosen, "rescale_factor": rescale_factor}', "return chosen", ("tests/test_channels.py",)),
    Plant("classifier_loses_the_data_sets_statistics", "modeling_mae/loops/finetuning_setup.py",
          '"use_mean_pooling": model_args.global_pool, **statistics}', '"use_mean_pooling": model_args.global_pool}',
          ("tests/test_channels.py",)),
)


def whole_files(plant: Plant, scratch: pathlib.Path) -> tuple[str, ...]:
    """The files of the plant's tests, as the issue's reviewer ran them (a tree without them: the planted code's)."""
    files = sorted({test.split("::")[0] for test in plant.tests if test.startswith("tests/")})
    present = tuple(name for name in files if (scratch / name).is_file())
    return present or tuple(test for prefix, test in TEST_FILE_OF_CODE.items() if plant.path.startswith(prefix))[:1]


def run_plant(plant: Plant, scratch: pathlib.Path, tests: tuple[str, ...]) -> tuple[str, float, str]:
    """(CAUGHT | SURVIVED | STALE | TIMEOUT, seconds, the tail of pytest's output)."""
    path = scratch / plant.path
    original = path.read_text()
    if original.count(plant.old) != 1:
        return "STALE", 0.0, f"{plant.path}: the snippet occurs {original.count(plant.old)} times"
    path.write_text(original.replace(plant.old, plant.new))
    env = {**os.environ, "PYTHONPATH": str(scratch), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            check=False, cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return "TIMEOUT", time.perf_counter() - start, ""
    finally:
        path.write_text(original)
    verdict = "SURVIVED" if completed.returncode == 0 else "CAUGHT"
    return verdict, time.perf_counter() - start, (completed.stdout + completed.stderr)[-1500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="Run the plants whose name contains one of these (a, b, ...).")
    parser.add_argument("--list", action="store_true", help="List the plants and their tests, run nothing.")
    parser.add_argument("--verbose", action="store_true", help="Print pytest's output of every plant.")
    parser.add_argument("--tree", type=pathlib.Path, default=REPO, help="The checkout to plant in (default: this).")
    parser.add_argument("--whole_files", action="store_true",
                        help="Run the whole test files of each plant's tests (for a tree without the new tests).")
    parser.add_argument("--deselect", default="", help="With --whole_files: a -k expression of tests to leave out.")
    args = parser.parse_args(argv)
    plants = [plant for plant in PLANTS if any(part in plant.name for part in args.only.split(","))]
    if args.list:
        for plant in plants:
            applies = (REPO / plant.path).read_text().count(plant.old) == 1
            print(f"{plant.name:40} {'' if applies else 'STALE '}{plant.path:32} {' '.join(plant.tests)}")
        return 0
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="planted_bugs_") as directory:
        scratch = pathlib.Path(directory)
        copy_tree(args.tree.resolve(), scratch)
        for plant in plants:
            tests = plant.tests
            if args.whole_files:
                tests = (*whole_files(plant, scratch), *(("-k", args.deselect) if args.deselect else ()))
            verdict, seconds, output = run_plant(plant, scratch, tests)
            verdicts.append(verdict)
            print(f"{verdict:9} {seconds:6.1f}s  {plant.name}", flush=True)
            if args.verbose or verdict in ("SURVIVED", "STALE"):
                print("    " + output.replace("\n", "\n    "))
    caught = verdicts.count("CAUGHT")
    print(f"\n{caught} of {len(verdicts)} planted bugs caught")
    return 0 if caught == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
