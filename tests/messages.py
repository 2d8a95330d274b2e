"""Every message the bad-input tests expect, word for word: a reviewed list.

A change to any of them shows here, in review, and a garbled message (a
quoted repr, a second line, a lost flag name) fails the test that reads it.
Placeholders: {tfds} is TFDS_DATA_DIR, {workdir} and {tmp} the test's own
paths, {repo} the repository."""

import os


def expected(message: str, **paths) -> str:
  """`message` with its placeholders filled ({tfds} from the environment)."""
  paths.setdefault('tfds', os.environ.get('TFDS_DATA_DIR', ''))
  for name, value in paths.items():
    message = message.replace('{' + name + '}', str(value))
  return message


# tests/test_cli_config.py: `jaxcl train` with one bad override (8 devices).
CONFIG = {
    'unknown key':
        "jaxcl: error: unknown config key 'no_such_key' in --config.no_such_key (the keys are augment, batch_size, checkpoint_every_steps, compilation_cache_dir, dataset, decoder, device_memory_gb, distill, eval, eval_every_steps, init, keep_checkpoints, log_every_steps, loss, mesh, method, microbatch_size, model, name, nonfinite, optimizer, profile_steps, seed, self_distill, temperature, text, total_steps, wandb)",
    'unknown nested key':
        "jaxcl: error: unknown config key 'depth' in --config.model.depth (did you mean 'width'?)",
    'wrong type':
        "jaxcl: error: --config.batch_size takes an integer, got 'many'",
    'batch not divisible':
        "jaxcl: error: batch_size 30 is not divisible by the 8 data shards of the mesh {'data': 8, 'fsdp': 1}",
    'tau <= 0':
        'jaxcl: error: temperature.init must be > 0, got 0.0',
    'negative tau min':
        'jaxcl: error: temperature.min must be > 0, got -0.1',
    'tau min > max':
        'jaxcl: error: temperature.min 0.5 must be <= temperature.max 0.2',
    'tau mode':
        "jaxcl: error: temperature.mode must be one of ('fixed', 'learnable', 'cosine', 'free', 'individual', 'predicted'), got 'warm'",
    'missing dataset':
        "jaxcl: error: dataset.name: no TFDS dataset named 'no_such_dataset'",
    'unprepared dataset':
        "jaxcl: error: dataset 'cifar10' is not prepared under {tfds}; prepare it or set --config.dataset.download=True",
    'mesh too big':
        "jaxcl: error: mesh: mesh {'data': 16, 'fsdp': 1} needs 16 devices, there are 8",
    'negative steps':
        'jaxcl: error: total_steps must be >= 0, got -5',
    'model':
        "jaxcl: error: model.name must be one of ['resnet18', 'resnet34', 'resnet50', 'vit_ti16', 'vit_s16', 'vit_b16', 'vit_l16', 'vit'], got 'vgg'",
    'optimizer':
        "jaxcl: error: optimizer.name must be one of ('lars', 'adamw', 'sgd'), got 'rmsprop'",
    'model dtype':
        "jaxcl: error: model.dtype must be one of ('float32', 'bfloat16', 'float16'), got 'bf16'",
    'std zero':
        'jaxcl: error: dataset.std values must be > 0, got (0.0,)',
    'mean length':
        'jaxcl: error: dataset.mean needs 1 or 3 numbers (per channel), got (0.1, 0.2)',
    'probe steps':
        'jaxcl: error: eval.probe_steps must be > 0, got 0',
    'warmup':
        'jaxcl: error: optimizer.warmup_steps must be >= 0, got -1',
    'image key':
        "jaxcl: error: dataset 'digits' has no feature 'img' (dataset.image_key); it has image, label",
    'eval split':
        "jaxcl: error: dataset 'digits' has no split 'validation' (it has train, test)",
    'method':
        "jaxcl: error: method must be one of ('simclr', 'clip', 'siglip'), got 'moco'",
    'init source missing':
        'jaxcl: error: init.source /no/such/run is not a directory (a jaxcl workdir or a '
        'checkpoint directory jaxcl import reads)',
    'init old name':
        'jaxcl: error: --config.init.from: init.from is now called init.source; use '
        '--config.init.source=/no/such/run',
    'init as a group':
        'jaxcl: error: --config.init names a group of keys (load, source): set each one, '
        '--config.init.KEY=VALUE',
    'negated unknown key':
        "jaxcl: error: unknown config key 'flipp' in --config.augment.flipp (did you mean 'flip'?)",
    'negated old name':
        'jaxcl: error: --config.init.from: init.from is now called init.source; use '
        '--config.init.source',
    'clip text heads':
        'jaxcl: error: text.width 64 is not divisible by text.heads 5',
    'clip text length':
        'jaxcl: error: text.max_length must be >= 2 (a token and end-of-text), got 1',
    'clip sentencepiece without a model':
        'jaxcl: error: text: text.tokenizer=sentencepiece needs text.sentencepiece_model (a path)',
    'clip sentencepiece model missing':
        'jaxcl: error: text: text.sentencepiece_model /no/such.model does not exist',
    'clip tokenizer':
        "jaxcl: error: text: text.tokenizer must be one of ('bytes', 'sentencepiece', 'clip_bpe'), got 'words'",
    'clip vit patch':
        'jaxcl: error: augment.image_size 32 is not divisible by the ViT patch size 5',
    'clip vit heads':
        'jaxcl: error: model.vit.width 128 is not divisible by model.vit.heads 5',
    'clip text key':
        "jaxcl: error: dataset 'captioned_shapes' has no feature 'caption' (dataset.text_key); it has image, captions, label, boxes, box_labels, box_captions, segmentation",
    'clip template':
        "jaxcl: error: eval.zeroshot_templates: 'a photo' needs exactly one '{}' for the class name and no other braces",
    'clip template field':
        "jaxcl: error: eval.zeroshot_templates: 'a {label}' needs exactly one '{}' for the class name and no other braces",
    'clip class names':
        "jaxcl: error: eval.class_names has 2 names, the labels of 'captioned_shapes' have 24 classes",
    'clip image folder has no captions':
        'jaxcl: error: clip needs captions: image_folder has none; use a TFDS image-text dataset or dataset.name=image_text_pairs',
    'clip pairs file missing':
        'jaxcl: error: dataset.path /no/such/pairs.jsonl is not a file',
}

# tests/test_cli_fuzz.py, seed 0: the random bad overrides of `jaxcl train` (1 device).
FUZZ_SEED_0 = {
    '--config.self_distill.head_bottleneck=2.5':
        "jaxcl: error: --config.self_distill.head_bottleneck takes an integer, got '2.5'",
    '--config.self_distill.patch_teacher_temperature=fast':
        "jaxcl: error: --config.self_distill.patch_teacher_temperature takes a number, got 'fast'",
    '--config.selfndistill.momentum=0.5':
        "jaxcl: error: unknown config key 'selfndistill' in --config.selfndistill.momentum (did you mean 'self_distill'?)",
    '--config.self_distill.patch_teacher_temperature_x=0.5':
        "jaxcl: error: unknown config key 'patch_teacher_temperature_x' in --config.self_distill.patch_teacher_temperature_x (did you mean 'patch_teacher_temperature'?)",
    '--config.self_distill.weight=fast':
        "jaxcl: error: --config.self_distill.weight takes a number, got 'fast'",
    '--config.eval.probe_lr=0.0':
        'jaxcl: error: eval.probe_lr must be > 0, got 0.0',
    '--config.model.dtype=int32':
        "jaxcl: error: model.dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int32'",
    '--config.optimizer.name=adam_w':
        "jaxcl: error: optimizer.name must be one of ('lars', 'adamw', 'sgd'), got 'adam_w'",
    '--config.method=moco':
        "jaxcl: error: method must be one of ('simclr', 'clip', 'siglip'), got 'moco'",
    '--config.loss.impl=sparse':
        "jaxcl: error: loss.impl must be one of ('auto', 'dense', 'blockwise', 'ring'), got 'sparse'",
    '--config.dataset.name=no_such_dataset':
        "jaxcl: error: dataset.name: no TFDS dataset named 'no_such_dataset'",
    '--config.loss.estimator=moving':
        "jaxcl: error: loss.estimator must be one of ('batch', 'sogclr'), got 'moving'",
    '--config.optimizer.weight_decay=nan':
        'jaxcl: error: optimizer.weight_decay must be >= 0, got nan',
    '--config.optimizer.learning_rate=fast':
        "jaxcl: error: --config.optimizer.learning_rate takes a number, got 'fast'",
    '--config.optimizer.momentum=1.5':
        'jaxcl: error: optimizer.momentum must be in [0, 1), got 1.5',
    '--config.log_every_steps=abc':
        "jaxcl: error: --config.log_every_steps takes an integer, got 'abc'",
    '--config.optimizer.b1_old=abc':
        "jaxcl: error: unknown config key 'b1_old' in --config.optimizer.b1_old (did you mean 'b1'?)",
    '--config.optimizer.warmup_steps=-10':
        'jaxcl: error: optimizer.warmup_steps must be >= 0, got -10',
    '--config.temperature.individual_eta=fast':
        "jaxcl: error: --config.temperature.individual_eta takes a number, got 'fast'",
    '--config.temperature.period=-5':
        'jaxcl: error: temperature.period must be an integer >= 0, got -5',
    '--config.batch_size=0':
        'jaxcl: error: batch_size must be > 0, got 0',
    '--config.optimizer.learning_rate=0.0':
        'jaxcl: error: optimizer.learning_rate must be > 0, got 0.0',
    '--config.model.head_hidden=[1]':
        "jaxcl: error: --config.model.head_hidden takes an integer, got '[1]'",
    '--config.eval.zeroshot=(1,':
        "jaxcl: error: --config.eval.zeroshot takes a tuple, got '(1,'",
    '--config.temperature.warmup_steps=-1':
        'jaxcl: error: temperature.warmup_steps must be an integer >= 0, got -1',
    "--config.loss.estimator=''":
        'jaxcl: error: loss.estimator must be one of (\'batch\', \'sogclr\'), got "\'\'"',
    '--config.eval.prpobe_l2=0.5':
        "jaxcl: error: unknown config key 'prpobe_l2' in --config.eval.prpobe_l2 (did you mean 'probe_l2'?)",
    '--config.total_steps=-1':
        'jaxcl: error: total_steps must be >= 0, got -1',
    '--config.optimizer.grad_clp_norm=0.5':
        "jaxcl: error: unknown config key 'grad_clp_norm' in --config.optimizer.grad_clp_norm (did you mean 'grad_clip_norm'?)",
    '--config.eval.probe_l2=-1.0':
        'jaxcl: error: eval.probe_l2 must be >= 0, got -1.0',
    '--config.method=SIMCLR':
        "jaxcl: error: method must be one of ('simclr', 'clip', 'siglip'), got 'SIMCLR'",
    '--config.augment.crop_scale_max=2.0':
        'jaxcl: error: need 0 < augment.crop_scale_min <= crop_scale_max <= 1, got 0.4, 2.0',
    '--config.model.scan_oayers=0.5':
        "jaxcl: error: unknown config key 'scan_oayers' in --config.model.scan_oayers (did you mean 'scan_layers'?)",
    '--config.model.vit.patch_size=1e3x':
        "jaxcl: error: --config.model.vit.patch_size takes an integer, got '1e3x'",
    '--config.optimizer.b2=fast':
        "jaxcl: error: --config.optimizer.b2 takes a number, got 'fast'",
    '--config.augment.image_size=[1]':
        "jaxcl: error: --config.augment.image_size takes an integer, got '[1]'",
    '--config.model.head_layers=0':
        'jaxcl: error: model.head_layers must be a positive integer, got 0',
    '--config.dataset.eval_test_split_x=1':
        "jaxcl: error: unknown config key 'eval_test_split_x' in --config.dataset.eval_test_split_x (did you mean 'eval_test_split'?)",
    '--config.temperature.init=0.0':
        'jaxcl: error: temperature.init must be > 0, got 0.0',
    '--config.eval.probe_lr=fast':
        "jaxcl: error: --config.eval.probe_lr takes a number, got 'fast'",
    '--config.temperature.warmup_stmeps=0.5':
        "jaxcl: error: unknown config key 'warmup_stmeps' in --config.temperature.warmup_stmeps (did you mean 'warmup_steps'?)",
    '--config.temperature.mode=frozen':
        "jaxcl: error: temperature.mode must be one of ('fixed', 'learnable', 'cosine', 'free', 'individual', 'predicted'), got 'frozen'",
    '--config.tfemperature.period=abc':
        "jaxcl: error: unknown config key 'tfemperature' in --config.tfemperature.period (did you mean 'temperature'?)",
    '--config.augment.grayscale_prob=2.0':
        'jaxcl: error: augment.grayscale_prob must be in [0, 1], got 2.0',
    '--config.model.stage_sizes=abc':
        "jaxcl: error: --config.model.stage_sizes takes a tuple, written (a, b) or [a, b]; got 'abc'",
    '--config.ctemperature.init=1':
        "jaxcl: error: unknown config key 'ctemperature' in --config.ctemperature.init (did you mean 'temperature'?)",
    '--config.temperature.lr_multiplier=0.0':
        'jaxcl: error: temperature.lr_multiplier must be > 0, got 0.0',
    '--config.temperature.bias_init=inf':
        'jaxcl: error: temperature.bias_init must be a finite number, got inf',
    '--config.mesh.data=3':
        "jaxcl: error: mesh: mesh {'data': 3, 'fsdp': 1} needs 3 devices, there are 1",
    '--config.augment.color_jitter_prob=-0.1':
        'jaxcl: error: augment.color_jitter_prob must be in [0, 1], got -0.1',
    '--config.dataset.eval_urls_size=abc':
        "jaxcl: error: unknown config key 'eval_urls_size' in --config.dataset.eval_urls_size (did you mean 'eval_urls'?)",
    '--config.augment.color_jitter_strength=fast':
        "jaxcl: error: --config.augment.color_jitter_strength takes a number, got 'fast'",
    '--config.eval.knn_k=[1]':
        "jaxcl: error: --config.eval.knn_k takes an integer, got '[1]'",
    '--config.loss.block_size=0':
        'jaxcl: error: loss.block_size must be a positive integer, got 0',
    '--config.temperature.max_size=0.5':
        "jaxcl: error: unknown config key 'max_size' in --config.temperature.max_size (did you mean 'max'?)",
    '--config.temperature.lr_multiplier=fast':
        "jaxcl: error: --config.temperature.lr_multiplier takes a number, got 'fast'",
    '--config.augment.crop_scale_maxa=abc':
        "jaxcl: error: unknown config key 'crop_scale_maxa' in --config.augment.crop_scale_maxa (did you mean 'crop_scale_max'?)",
    '--config.dataset.data_dir_size=1':
        "jaxcl: error: unknown config key 'data_dir_size' in --config.dataset.data_dir_size (did you mean 'data_dir'?)",
    '--config.teperature.per_direction=abc':
        "jaxcl: error: unknown config key 'teperature' in --config.teperature.per_direction (did you mean 'temperature'?)",
    '--config.text.causal=2':
        "jaxcl: error: --config.text.causal takes True or False, got '2'",
    '--config.decoder.weeght=0.5':
        "jaxcl: error: unknown config key 'weeght' in --config.decoder.weeght (did you mean 'weight'?)",
    '--config.decoder.mlp_dim_old=0.5':
        "jaxcl: error: unknown config key 'mlp_dim_old' in --config.decoder.mlp_dim_old (did you mean 'mlp_dim'?)",
    '--config.distill.teacher_x=0.5':
        "jaxcl: error: unknown config key 'teacher_x' in --config.distill.teacher_x (did you mean 'teacher'?)",
    '--config.decoder.tasks=(1,':
        "jaxcl: error: --config.decoder.tasks takes a tuple, got '(1,'",
}

# tests/test_cli_safety.py: the CLI's own flags, workdirs, saved configs,
# config files and datasets.
CLI = {
    'not a workdir':
        'jaxcl: error: workdir {tmp} holds files but is not a jaxcl workdir (no config.json; it '
        'has eval.json, metrics.jsonl); use a new or empty directory',
    'export onto config.json':
        'jaxcl: error: --output {workdir}/config would write {workdir}/config.json, where the '
        'jaxcl workdir {workdir} keeps its own files; choose another name',
    'export onto eval.json':
        'jaxcl: error: --output {workdir}/eval would write {workdir}/eval.json, where the jaxcl '
        'workdir {workdir} keeps its own files; choose another name',
    'export into checkpoints':
        'jaxcl: error: --output {workdir}/checkpoints/x would write {workdir}/checkpoints/x, '
        'where the jaxcl workdir {workdir} keeps its own files; choose another name',
    'export onto a folder':
        'jaxcl: error: --output {tmp}: {tmp} is a directory; give a file name',
    'export into /proc':
        'jaxcl: error: cannot write --output /proc/x: No such file or directory',
    'export onto an existing file':
        'jaxcl: error: --output {tmp}/mine.bin would replace {tmp}/mine.bin, which exists; pass '
        '--overwrite to replace it',
    'saved config empty':
        'jaxcl: error: {workdir}/config.json is not a whole jaxcl config: it lacks 59 key(s) '
        '(augment.blur_prob, augment.color_jitter_prob, augment.color_jitter_strength, '
        'augment.crop_scale_max, augment.crop_scale_min, augment.flip and 53 more)',
    'saved config a list':
        'jaxcl: error: {workdir}/config.json holds a JSON list, not a config object',
    'saved config not JSON':
        "jaxcl: error: {workdir}/config.json is not valid JSON (Expecting ',' delimiter: line 1 "
        'column 18 (char 17))',
    'no checkpoint':
        'jaxcl: error: {workdir} has no checkpoint to load',
    'second ctrl-c':
        'jaxcl: stopped (Ctrl-C); nothing after the last complete checkpoint was saved',
    'config without get_config':
        'jaxcl: error: config file {tmp}/config.py has no get_config() function',
    'config that raises':
        'jaxcl: error: config file {tmp}/config.py: get_config() raised ValueError: no such '
        'recipe',
    'config returning None':
        'jaxcl: error: config file {tmp}/config.py: get_config() returned NoneType, not an '
        'ml_collections.ConfigDict',
    'config calling sys.exit':
        'jaxcl: error: config file {tmp}/config.py: get_config() called sys.exit(3)',
    'config with a syntax error':
        'jaxcl: error: config file {tmp}/config.py fails to load: SyntaxError: invalid syntax '
        '(line 1)',
    'report on a folder':
        'jaxcl: error: {tmp} is neither a jaxcl workdir (config.json) nor a sweep (sweep.json): '
        'nothing to report',
    'extra argument':
        "jaxcl: error: jaxcl eval takes no positional arguments, got 'extra'",
    'flag of another command':
        'jaxcl: error: jaxcl report does not take --temperatures (its flags: --workdir)',
    'override without a config':
        'jaxcl: error: jaxcl eval does not take --config.batch_size (its flags: '
        '--coordinator_address, --heartbeat_timeout, --max_patches, --num_processes, '
        '--process_id, --retrieval, --workdir, --zeroshot)',
    'unknown flag':
        'jaxcl: error: unknown flag --workdr (did you mean --workdir?)',
    'sweep without a config':
        'jaxcl: error: --config is required',
    'export without an output':
        'jaxcl: error: --output is required',
    'a tau twice':
        'jaxcl: error: --temperatures lists one τ twice (0.1 and 0.10)',
    'unknown command':
        "jaxcl: error: unknown command 'fly'; choose one of: train | eval | export | sweep | report | import "
        '| shard',
    'no command':
        'jaxcl: error: choose a command: train | eval | export | sweep | report | import | shard; jaxcl '
        '--help for more',
    'dataset smaller than a batch':
        "jaxcl: error: dataset 'image_folder' has 3 training example(s), fewer than one batch of "
        '8; lower batch_size or add data',
    'sweep rerun with another config':
        'jaxcl: error: {workdir} holds a sweep with a different config '
        '(optimizer.learning_rate: 0.002 there, 0.001 now); use a new workdir',
}
