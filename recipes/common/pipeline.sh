#!/usr/bin/env bash
# Stages 1-9 of the hybrid HMM/DNN distillation recipe, shared by recipes/librispeech and
# recipes/mini. Sourced by their run.sh after options are parsed; it expects these variables:
#   exp corpus_dir train_set dev_sets test_sets transfer_sets conf train_conf nj members device ngpu
#   ensemble_sizes decode_ensemble_sizes students lexicon_extra vocab_file lm_text arpa train_overrides
#   gmm_acwt_grid nn_acwt_grid labels (mono | tri; default mono)
#   stage stop_stage
# and optionally: prep_subsets (corpus subsets to read, default: every set), split_spec
# (prepare-librispeech --split SUBSET:NAME=N,...: sets made by splitting a subset by speaker; seed
# split_seed),
# lm_transcripts=yes (train the LM on the training transcripts too); vocab_file may list several.
# Every step is one `asr` call with explicit inputs and one output dir (plus, where a step writes
# elsewhere, its --outputs), skipped by run_step (asr/step.py) when its stamp (command + config +
# upstream stamps) is unchanged and its outputs are intact.

labelled_sets="$train_set $dev_sets $test_sets"
all_sets="$labelled_sets $transfer_sets"      # transfer sets: audio only (distillation never reads their text)
eval_sets="$dev_sets $test_sets"
tune_set=${dev_sets%% *}          # acwt is tuned on the first dev set, never on test
data=$exp/data
asr=(asr)

# ---- stage 1: manifests, lexicon, OOV report
if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  log "stage 1: data preparation"
  manifests=(); for s in $all_sets; do manifests+=("$data/$s/manifest.jsonl"); done
  split_opts=(); [ -n "${split_spec:-}" ] && split_opts=(--split "$split_spec" --split-seed "${split_seed:-0}")
  # tree: the stamp covers the corpus files (names, sizes, mtimes), so a fixed file is picked up.
  run_step "$data/manifests" "tree:$corpus_dir" --outputs "${manifests[*]}" -- \
    "${asr[@]}" prepare-librispeech --corpus-dir "$corpus_dir" --subsets "${prep_subsets:-$(echo $all_sets | tr ' ' ,)}" \
      --out-dir "$data" --nj "$nj" "${split_opts[@]}"
  manifests=(); for s in $labelled_sets; do manifests+=("$data/$s/manifest.jsonl"); done
  extra=(); [ -n "$lexicon_extra" ] && [ -f "$lexicon_extra" ] && extra=(--extra "$lexicon_extra")
  run_step "$data/local" "$data/manifests $conf/lexicon.yaml" -- \
    "${asr[@]}" prepare-lexicon --out "$data/local" --config "$conf/lexicon.yaml" "${extra[@]}" \
      --manifests "${manifests[@]}"
fi

# ---- stage 2: log-mel filterbank features + CMVN statistics
if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  log "stage 2: features"
  for s in $all_sets; do
    run_step "$exp/feats/$s" "$data/manifests $conf/fbank.yaml" -- \
      "${asr[@]}" make-feats --manifest "$data/$s/manifest.jsonl" --out-dir "$exp/feats/$s" \
        --config "$conf/fbank.yaml" --nj "$nj"
  done
fi

# ---- stage 3: lang, language model, HCLG
if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  log "stage 3: lang, LM"
  vocabs=(); for v in $vocab_file; do vocabs+=(--vocab "$v"); done
  run_step "$exp/lang" "$data/local $conf/lang.yaml" -- \
    "${asr[@]}" prepare-lang --lexicon "$data/local/lexicon.txt" --out-dir "$exp/lang" \
      --config "$conf/lang.yaml" "${vocabs[@]}"
  evals=(); for s in $eval_sets; do evals+=(--eval "$s=$data/$s/manifest.jsonl"); done
  lm_src=(); lm_inputs="$exp/lang $conf/lm.yaml"
  if [ -n "$arpa" ]; then lm_src=(--arpa "$arpa")
  else
    [ -n "$lm_text" ] && lm_src=(--text "$lm_text")
    if [ "${lm_transcripts:-no}" = yes ]; then   # a user's text plus the training transcripts
      lm_src+=(--transcripts "$data/$train_set/manifest.jsonl"); lm_inputs+=" $lm_text"
    fi
  fi
  run_step "$exp/lm" "$lm_inputs" -- \
    "${asr[@]}" train-lm "${lm_src[@]}" --lang-dir "$exp/lang" --out-dir "$exp/lm" \
      --config "$conf/lm.yaml" "${evals[@]}"
  # HCLG is built in stage 4, with the trained transition model of the GMM it belongs to.
fi

# ---- stage 4: GMM-HMMs; frame labels for every set; HCLG
# labels=mono: the monophone GMM's pdfs are the labels (ali/) and graph/ is its HCLG.
# labels=tri: a triphone tree and GMM (Kaldi tri1) on the monophone alignment (ali_mono/); the
# labels are its tied states (ali/), graph/ is the context-dependent HCLG, graph_mono/ the monophone one.
labels=${labels:-mono}
case "$labels" in
  mono) mono_ali=$exp/ali; mono_graph=$exp/graph ;;
  tri) mono_ali=$exp/ali_mono; mono_graph=$exp/graph_mono ;;
  *) log "labels must be mono or tri, got '$labels'"; exit 1 ;;
esac
if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
  log "stage 4: GMM training and alignment (labels=$labels)"
  run_step "$exp/gmm_mono" "$exp/lang $exp/feats/$train_set $conf/gmm.yaml" --outputs "$mono_ali/$train_set" -- \
    "${asr[@]}" train-gmm --feats-dir "$exp/feats/$train_set" --manifest "$data/$train_set/manifest.jsonl" \
      --lang-dir "$exp/lang" --out-dir "$exp/gmm_mono" --ali-dir "$mono_ali/$train_set" \
      --config "$conf/gmm.yaml" --nj "$nj"
  for s in $eval_sets; do
    run_step "$mono_ali/$s" "$exp/gmm_mono $exp/feats/$s" -- \
      "${asr[@]}" align --model-dir "$exp/gmm_mono" --lang-dir "$exp/lang" --feats-dir "$exp/feats/$s" \
        --manifest "$data/$s/manifest.jsonl" --out-dir "$mono_ali/$s" --nj "$nj"
  done
  run_step "$mono_graph" "$exp/lang $exp/lm $exp/gmm_mono" -- \
    "${asr[@]}" make-graph --lang-dir "$exp/lang" --lm-dir "$exp/lm" --out-dir "$mono_graph" \
      --transition-model "$exp/gmm_mono"
  if [ "$labels" = tri ]; then
    run_step "$exp/tree" "$exp/gmm_mono $conf/tree.yaml" -- \
      "${asr[@]}" build-tree --ali-dir "$mono_ali/$train_set" --feats-dir "$exp/feats/$train_set" \
        --lang-dir "$exp/lang" --mono-dir "$exp/gmm_mono" --out-dir "$exp/tree" --config "$conf/tree.yaml"
    run_step "$exp/gmm_tri" "$exp/tree $conf/tri.yaml" --outputs "$exp/ali/$train_set" -- \
      "${asr[@]}" train-tri --tree-dir "$exp/tree" --mono-dir "$exp/gmm_mono" --feats-dir "$exp/feats/$train_set" \
        --manifest "$data/$train_set/manifest.jsonl" --lang-dir "$exp/lang" --out-dir "$exp/gmm_tri" \
        --ali-dir "$exp/ali/$train_set" --config "$conf/tri.yaml" --nj "$nj"
    for s in $eval_sets; do
      run_step "$exp/ali/$s" "$exp/gmm_tri $exp/feats/$s" -- \
        "${asr[@]}" align --model-dir "$exp/gmm_tri" --lang-dir "$exp/lang" --feats-dir "$exp/feats/$s" \
          --manifest "$data/$s/manifest.jsonl" --out-dir "$exp/ali/$s" --nj "$nj"
    done
    run_step "$exp/graph" "$exp/lang $exp/lm $exp/gmm_tri" -- \
      "${asr[@]}" make-graph --lang-dir "$exp/lang" --lm-dir "$exp/lm" --out-dir "$exp/graph" \
        --transition-model "$exp/gmm_tri"
  fi
fi

# torchrun for several GPUs; one process otherwise.
train_launch=("${asr[@]}")
train_set_opts=(); distill_set_opts=()
if [ -n "$train_overrides" ]; then
  # shellcheck disable=SC2206
  train_set_opts=(--set $train_overrides); distill_set_opts=(--train-set $train_overrides)
fi
[ "$ngpu" -gt 1 ] && train_launch=(torchrun --standalone --nproc-per-node "$ngpu" -m asr.cli)

# ---- stage 5: N members with cross-entropy, seeds 1..N; their posteriors on dev/test
if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  log "stage 5: train $members members"
  first_dev=${dev_sets%% *}
  run_step "$exp/members" "$exp/gmm_mono $exp/ali/$first_dev $train_conf" -- \
    "${train_launch[@]}" train-members --feats-dir "$exp/feats/$train_set" --ali-dir "$exp/ali/$train_set" \
      --dev-feats-dir "$exp/feats/$first_dev" --dev-ali-dir "$exp/ali/$first_dev" \
      --out-dir "$exp/members" --members "$members" --config "$train_conf" --device "$device" "${train_set_opts[@]}"
  for s in $eval_sets; do
    models=(); outs=()
    for i in $(seq 1 "$members"); do models+=("$exp/members/seed$i/model.pt"); outs+=("$exp/members/seed$i/post/$s.npy"); done
    run_step "$exp/members/post_$s" "$exp/members $exp/feats/$s" --outputs "${outs[*]}" -- \
      "${asr[@]}" posteriors --model "${models[@]}" --feats-dir "$exp/feats/$s" --out "${outs[@]}" --device "$device"
  done
fi

member_dirs=(); for i in $(seq 1 "$members"); do member_dirs+=("$exp/members/seed$i"); done
teachers=(); for d in "${member_dirs[@]}"; do teachers+=("$d/model.pt"); done

# ---- stage 6: ensembles of the first k members (posteriors, priors, frame accuracy for every k)
if [ "$stage" -le 6 ] && [ "$stop_stage" -ge 6 ]; then
  log "stage 6: ensembles ($ensemble_sizes)"
  post_stamps=""; for s in $eval_sets; do post_stamps+=" $exp/members/post_$s"; done
  run_step "$exp/ensemble" "$post_stamps" -- \
    "${asr[@]}" ensemble --members "${member_dirs[@]}" --sets $eval_sets --out-dir "$exp/ensemble" \
      --sizes "$ensemble_sizes" --ali-root "$exp/ali"
fi

# ---- stage 7: distilled students: one folder per variant ($students), each a conf/<variant>.yaml;
# a variant sweeping several temperatures trains them stacked and keeps the best on dev.
if [ "$stage" -le 7 ] && [ "$stop_stage" -ge 7 ]; then
  first_dev=${dev_sets%% *}
  posts=(); for s in $eval_sets; do posts+=(--post "$s=$exp/feats/$s"); done
  transfer=(); transfer_stamps=""
  for s in $transfer_sets; do transfer+=("$exp/feats/$s"); transfer_stamps+=" $exp/feats/$s"; done
  [ ${#transfer[@]} -gt 0 ] && transfer=(--transfer-feats "${transfer[@]}")
  for variant in $students; do
    log "stage 7: distillation ($variant, $conf/$variant.yaml)"
    run_step "$exp/$variant" "$exp/members $conf/$variant.yaml$transfer_stamps" -- \
      "${asr[@]}" distill --teachers "${teachers[@]}" --train-feats "$exp/feats/$train_set" \
        --train-ali "$exp/ali/$train_set" --dev-feats "$exp/feats/$first_dev" --dev-ali "$exp/ali/$first_dev" \
        --out-dir "$exp/$variant" "${transfer[@]}" --config "$conf/$variant.yaml" --device "$device" \
        "${distill_set_opts[@]}" "${posts[@]}"
  done
fi

# ---- stage 8: decode every system on every dev/test set (acwt and priors tuned on $tune_set, never on test)
# One `asr decode` call per family of systems, so its decoding workers load HCLG once.
if [ "$stage" -le 8 ] && [ "$stop_stage" -ge 8 ]; then
  log "stage 8: decoding"
  dec=("${asr[@]}" decode --exp-dir "$exp" --sets $eval_sets --train-set "$train_set" --nj "$nj" --config "$conf/decode.yaml")
  steps=$exp/decode/.steps              # stamps and logs of the multi-system steps
  # The monophone GMM on its own graph and labels; with labels=tri, the triphone GMM on graph/.
  run_step "$exp/decode/gmm-mono" "$exp/gmm_mono $mono_graph $conf/decode.yaml" -- \
    "${dec[@]}" --system "$exp/gmm_mono" --graph-dir "$mono_graph" --ali-root "$(basename "$mono_ali")" \
      --tune-set "$tune_set" --acwt-grid "$gmm_acwt_grid"
  if [ "$labels" = tri ]; then
    run_step "$exp/decode/gmm-tri" "$exp/gmm_tri $exp/graph $conf/decode.yaml" -- \
      "${dec[@]}" --system "$exp/gmm_tri" --tune-set "$tune_set" --acwt-grid "$gmm_acwt_grid"
  fi
  # Members share one architecture and recipe: member 1 tunes acwt and priors, the others reuse them.
  run_step "$exp/decode/member-seed1" "$exp/members $exp/graph $conf/decode.yaml" -- \
    "${dec[@]}" --system "$exp/members/seed1" --tune-set "$tune_set" --acwt-grid "$nn_acwt_grid"
  if [ "$members" -gt 1 ]; then
    decoded=(); for i in $(seq 2 "$members"); do decoded+=("$exp/decode/member-seed$i"); done
    run_step "$steps/members" "$exp/decode/member-seed1" --outputs "${decoded[*]}" -- \
      "${dec[@]}" --system "${member_dirs[@]:1}" --acwt-from "$exp/decode/member-seed1/tune.json"
  fi
  # Ensembles: the largest tunes, the few others decoded for WER reuse its choice (every size has
  # frame accuracy from stage 6, which is what the ensemble-size curve plots).
  kmax=$(echo "$ensemble_sizes" | tr , '\n' | sort -n | tail -1)
  run_step "$exp/decode/ensemble-$kmax" "$exp/ensemble $exp/graph $conf/decode.yaml" -- \
    "${dec[@]}" --system "$exp/ensemble/post_$kmax" --tune-set "$tune_set" --acwt-grid "$nn_acwt_grid"
  smaller=(); decoded=(); for k in $(echo "$decode_ensemble_sizes" | tr , ' '); do
    case ",$ensemble_sizes," in *",$k,"*)
      [ "$k" -gt 1 ] && [ "$k" -lt "$kmax" ] && smaller+=("$exp/ensemble/post_$k") && decoded+=("$exp/decode/ensemble-$k");;
    esac
  done
  if [ ${#smaller[@]} -gt 0 ]; then
    run_step "$steps/ensembles" "$exp/decode/ensemble-$kmax" --outputs "${decoded[*]}" -- \
      "${dec[@]}" --system "${smaller[@]}" --acwt-from "$exp/decode/ensemble-$kmax/tune.json"
  fi
  # Students: each variant's chosen student (distill*/choice.json) tunes its own acwt and priors
  # (soft training changes its calibration).
  for variant in $students; do
    run_step "$steps/$variant" "$exp/$variant $exp/graph $conf/decode.yaml" \
        --outputs "$exp/decode/$(student_system_name "$exp/$variant")" -- \
      "${dec[@]}" --system "$exp/$variant" --tune-set "$tune_set" --acwt-grid "$nn_acwt_grid"
  done
fi

# ---- stage 9: RESULTS.md, results.json, plots; print the table
if [ "$stage" -le 9 ] && [ "$stop_stage" -ge 9 ]; then
  log "stage 9: report"
  "${asr[@]}" report --exp-dir "$exp" --sets $eval_sets --students $students
  log "wrote $exp/RESULTS.md and $exp/results.json"
fi
