#!/usr/bin/env bash
# The worker half of tpu_scripts/jlora-tpu. `jlora-tpu setup` and `jlora-tpu run` copy this file
# to every TPU VM of the slice as ~/jlora-tpu-worker.sh and call it there over
# `gcloud compute tpus tpu-vm ssh --worker=all`; it is not meant to be run by hand.
#
#   bash jlora-tpu-worker.sh setup --repo URL --commit SHA [--dir DIR] [--python PY] [--fresh-venv] [-- PIP_ARGS...]
#   bash jlora-tpu-worker.sh run [--dir DIR] -- COMMAND...
#   bash jlora-tpu-worker.sh stop
#
# Each worker finds its own index in the GCE metadata (agent-worker-number, the value JAX's Cloud
# TPU cluster detection reads too) and its slice in tpu-env (MEGASCALE_SLICE_ID, multislice only).
# JLORA_TPU_WORKER_ID / JLORA_TPU_SLICE_ID override both (the tests use them).
#
# State lives in ~/jlora-tpu: logs/worker-<i>.log (the current run's output; the run before is
# kept as worker-<i>.log.prev) and run.pgid (the process group of the running command).
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
STATE=$HOME/jlora-tpu
EXIT_MARK=__JLORA_TPU_EXIT__
SETUP_MARK=__JLORA_TPU_SETUP__
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes

die() {
	printf 'jlora-tpu-worker: %s\n' "$1" >&2
	exit "${2:-2}"
}

metadata() {
	curl -sf --max-time 10 -H 'Metadata-Flavor: Google' "$METADATA/$1"
}

worker_id() {
	if [[ -n ${JLORA_TPU_WORKER_ID:-} ]]; then
		printf '%s' "$JLORA_TPU_WORKER_ID"
	else
		metadata agent-worker-number || die "cannot read agent-worker-number from the metadata server (not a Cloud TPU VM?)"
	fi
}

slice_id() {
	if [[ -n ${JLORA_TPU_SLICE_ID:-} ]]; then
		printf '%s' "$JLORA_TPU_SLICE_ID"
		return
	fi
	local env id
	env=$(metadata tpu-env 2>/dev/null || true)
	id=$(printf '%s\n' "$env" | sed -n "s/^MEGASCALE_SLICE_ID: *'\{0,1\}\([0-9]*\)'\{0,1\} *$/\1/p" | head -n 1)
	printf '%s' "${id:-0}"
}

# --------------------------------------------------------------------------------------- setup
cmd_setup() {
	local repo="" commit="" dir=jlora py=python3 fresh=0
	while [[ $# -gt 0 ]]; do
		case $1 in
		--repo) repo=$2; shift 2 ;;
		--commit) commit=$2; shift 2 ;;
		--dir) dir=$2; shift 2 ;;
		--python) py=$2; shift 2 ;;
		--fresh-venv) fresh=1; shift ;;
		--) shift; break ;;
		*) die "setup: unknown argument '$1'" ;;
		esac
	done
	[[ -n $repo && -n $commit ]] || die "setup: --repo and --commit are required"
	local pip_extra=("$@")
	cd "$HOME"

	# the tools the Makefile's recipe needs; TPU VM images are Ubuntu, so apt-get is there
	local need=()
	command -v git >/dev/null || need+=(git)
	command -v make >/dev/null || need+=(make)
	command -v "$py" >/dev/null || need+=("$py")
	if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=("${py##*/}-venv"); fi
	if [[ ${#need[@]} -gt 0 ]]; then
		echo "installing ${need[*]}" >&2
		sudo apt-get update -qq
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
	fi

	if [[ -d $dir/.git ]]; then
		git -C "$dir" remote set-url origin "$repo"
	else
		rm -rf "$dir"
		git clone --quiet --no-checkout "$repo" "$dir"
	fi
	git -C "$dir" fetch --quiet origin
	if ! git -C "$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
		git -C "$dir" fetch --quiet origin "$commit" || die "setup: commit $commit is not in $repo (pushed?)"
	fi
	git -C "$dir" checkout --quiet --force --detach "$commit"
	cd "$dir"
	[[ $fresh == 1 ]] && rm -rf .venv
	# the project's own recipe: a venv from requirements/pip.txt, the hashed lock, jlora editable,
	# then `tools/lockfiles.py pip-check` (see the Makefile's install target)
	make install PYTHON="$py"
	if [[ ${#pip_extra[@]} -gt 0 ]]; then
		.venv/bin/python -m pip install --quiet --disable-pip-version-check "${pip_extra[@]}"
		.venv/bin/python tools/lockfiles.py pip-check
	fi
	local head env
	head=$(git rev-parse HEAD)
	env=$(.venv/bin/python -m pip freeze --all | sha256sum | cut -c1-16)
	printf '%s worker=%s slice=%s commit=%s env=%s\n' "$SETUP_MARK" "$(worker_id)" "$(slice_id)" "$head" "$env"
}

# ----------------------------------------------------------------------------------------- run
child=""
tee_pid=""
wid=""
sid=""
reported=0

report() { # report RC: the marker line the launcher reads this worker's exit code from, once
	[[ $reported == 0 ]] || return 0
	reported=1
	printf '%s worker=%s slice=%s rc=%s\n' "$EXIT_MARK" "$wid" "$sid" "$1" || true
}

kill_group() { # kill_group PGID: TERM the group, wait up to 10 s, then KILL what is left
	local g=$1
	kill -TERM -- "-$g" 2>/dev/null || return 0
	for _ in $(seq 50); do
		kill -0 -- "-$g" 2>/dev/null || return 0
		sleep 0.2
	done
	kill -KILL -- "-$g" 2>/dev/null || true
}

on_signal() {
	trap - TERM INT HUP
	[[ -z $child ]] || kill_group "$child"
	rm -f "$STATE/run.pgid"
	report 143
	exit 143
}

cmd_run() {
	local dir=jlora
	while [[ $# -gt 0 ]]; do
		case $1 in
		--dir) dir=$2; shift 2 ;;
		--) shift; break ;;
		*) die "run: unknown argument '$1'" ;;
		esac
	done
	[[ $# -gt 0 ]] || die "run: no command after --"
	local log stream=0
	wid=$(worker_id)
	sid=$(slice_id)
	[[ $wid == 0 && $sid == 0 ]] && stream=1
	mkdir -p "$STATE/logs"
	log=$STATE/logs/worker-$wid.log
	[[ -f $log ]] && mv -f "$log" "$log.prev"
	: >"$log"

	cd "$HOME"
	[[ -d $dir ]] || die "run: $HOME/$dir does not exist; run 'jlora-tpu setup' first"
	cd "$dir"
	if [[ -x .venv/bin/python ]]; then
		export VIRTUAL_ENV=$PWD/.venv
		export PATH=$VIRTUAL_ENV/bin:$PATH
	fi
	export PYTHONUNBUFFERED=1

	trap on_signal TERM INT HUP
	if [[ $stream == 1 ]]; then
		# worker 0 shows its output on the launcher's terminal and keeps it in the log as well; -p:
		# when the ssh session goes away tee keeps writing the log instead of dying of SIGPIPE (and
		# taking the command with it), so a lost connection does not stop worker 0 alone
		local fifo=$STATE/stream.fifo
		rm -f "$fifo"
		mkfifo "$fifo"
		tee -p -a "$log" <"$fifo" &
		tee_pid=$!
		setsid -w "$@" >"$fifo" 2>&1 </dev/null &
		child=$!
	else
		setsid -w "$@" >>"$log" 2>&1 </dev/null &
		child=$!
	fi
	# a background child of this non-interactive shell is no group leader, so setsid does not fork:
	# the command's pid is its process group's id (-w keeps the exit status right if it ever forks)
	printf '%s\n' "$child" >"$STATE/run.pgid"
	local rc=0 group=$child
	wait "$child" || rc=$?
	child=""
	# a daemon the command left behind in its group would keep the fifo open: end the group
	kill -KILL -- "-$group" 2>/dev/null || true
	rm -f "$STATE/run.pgid"
	if [[ -n $tee_pid ]]; then
		wait "$tee_pid" || true
		rm -f "$STATE/stream.fifo"
	fi
	report "$rc"
	return "$rc"
}

# ---------------------------------------------------------------------------------------- stop
cmd_stop() {
	local pat g d
	# 1. the process group of this worker's running command, from run.pgid
	if [[ -f $STATE/run.pgid ]]; then
		g=$(cat "$STATE/run.pgid")
		[[ $g =~ ^[0-9]+$ ]] && kill_group "$g"
		rm -f "$STATE/run.pgid"
	fi
	# 2. earlier runs of this script whose pgid file is gone: their TERM trap ends their command.
	#    The [x]yz form keeps pkill from matching the shell that runs this very line.
	pat="[${SELF:0:1}]${SELF:1} run"
	sudo pkill -TERM -f "$pat" 2>/dev/null || true
	for _ in $(seq 50); do
		pgrep -f "$pat" >/dev/null 2>&1 || break
		sleep 0.2
	done
	sudo pkill -KILL -f "$pat" 2>/dev/null || true
	# 3. whatever still holds a TPU chip (/dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e)
	local devs=()
	for d in /dev/accel* /dev/vfio/[0-9]*; do
		[[ -e $d ]] && devs+=("$d")
	done
	if [[ ${#devs[@]} -gt 0 ]]; then
		local holders=()
		mapfile -t holders < <(sudo lsof -t -w "${devs[@]}" 2>/dev/null | sort -u || true)
		if [[ ${#holders[@]} -gt 0 ]]; then
			echo "killing TPU holders: ${holders[*]}" >&2
			sudo kill -KILL "${holders[@]}" 2>/dev/null || true
		fi
	fi
	return 0
}

case ${1:-} in
setup) shift; cmd_setup "$@" ;;
run) shift; cmd_run "$@" ;;
stop) shift; cmd_stop "$@" ;;
*) die "usage: bash jlora-tpu-worker.sh setup|run|stop ..." ;;
esac
