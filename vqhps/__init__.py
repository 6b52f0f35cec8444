"""VQ-HPS (Fiche et al.) reproduced: the Mesh-VQ-VAE, VQ-HPS, its baselines, ablations and analysis.

All logic lives in this package; the notebooks only call it. Each notebook and what it calls
(``module: names``; every notebook also calls ``config: load_config``, ``body_setup: setup_body``
and ``figures: save_figure, save_table``):

00_data.ipynb
    body_setup: posed_samples; body.regressors: regressor_error_mm; data.poses: PoseSampler,
    KEY_POSES; data.source: prepare, load_split, SPLITS, example_bodies, pretrain_sample,
    smpl_regressor_table, describe, is_paper; figures: render_meshes,
    image_grid, regressor_error_table, regressor_error_figure, sample_grid, front_back_figure,
    benchmark_histograms, data_summary
01_mesh_vqvae.ipynb
    vqvae_training: train_stage; data.source: split_meshes; distributed: launch;
    figures: vqvae_curves
02_reconstruction.ipynb
    vqvae_training: evaluation_meshes, load_mesh_vqvae, reconstruction_summary, part_errors,
    code_usage, token_regions; data.source: vertex_parts, PART_NAMES, hierarchy_levels; figures:
    reconstruction_heatmaps, code_usage_figure, token_region_figure
03_vqhps_training.ipynb
    hps_training: train_vqhps, train_vqhps_rot, history_frame, train_token_entropy,
    token_ce_summary, learning_curves_figure, vqhps_predictor, vqvae_floor_predictor,
    evaluate_split, metrics_table, ROTATION_COLUMNS; vqvae_training: load_mesh_vqvae;
    data.source: load_split; distributed: launch; train: device_of
04_evaluation.ipynb
    baseline_training: BASELINES, DISPLAY_NAMES, REFERENCE_METHODS, baseline_config,
    train_baseline, table1_predictors, evaluate_methods, table1; hps_training: history_frame,
    metrics_table, ROTATION_COLUMNS; figures_eval: baseline_curves_figure, pick_at_quantiles,
    QUALITATIVE_QUANTILES, predict_samples, qualitative_figure; vqvae_training: checkpoint_dir,
    load_mesh_vqvae; data.source: load_split; distributed: launch; train: device_of
05_ablations.ipynb
    ablations: RUNS, REFERENCE, load_vqvaes, schedule_note, train_ablation, load_table2_models,
    evaluate_ablations, with_paper, hurts_most, comparison_picks, canonical_predictions,
    loss_comparison_figure; data.source: load_split; distributed: launch; train: device_of
06_failure_cases.ipynb
    hps_training: vqhps_checkpoint, load_vqhps, vqhps_predictor; uncertainty: spread_vs_error,
    spearman_table, pick_examples, spread_examples, uncertainty_figure; failures: worst_cases,
    worst_cases_figure, load_per_sample, rotation_error_figure, flips, error_by_condition,
    error_by_condition_figure, failure_analysis_markdown, typical_case; figures_eval:
    predict_samples; demo: Predictor, demo_example; vqvae_training: load_mesh_vqvae;
    data.source: load_split; train: device_of

``data.source`` dispatches on ``cfg.data.source``: the synthetic benchmark or the paper's AMASS and
3DPW. The command line (``python -m vqhps``, :mod:`vqhps.cli`) calls the same functions; docs/design.md
describes the layers and README.md lists every module.
"""
