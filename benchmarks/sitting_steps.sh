# Sourced by the GPU sitting scripts (replication_sitting.sh, compile_sitting.sh): `step NAME COMMAND...` runs one
# stage (or, with DRY_RUN=1, prints "NAME: COMMAND"), its output in $P/NAME.log and a line in $P/stages.log as it
# starts and ends. The caller sets P, the sitting's folder. SKIP=NAME,NAME... leaves those stages out (stages a
# sitting already measured), with a line in stages.log (DRY_RUN prints "NAME: skipped").
step() {
  local name=$1; shift
  case ",${SKIP:-}," in
    *",$name,"*)
      if [ "${DRY_RUN:-0}" = 1 ]; then echo "$name: skipped"; return; fi
      mkdir -p $P; echo "[$(date +%H:%M:%S)] $name skipped" >> $P/stages.log; return 0 ;;
  esac
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "$name: $*"; return; fi
  mkdir -p $P
  echo "[$(date +%H:%M:%S)] $name started" >> $P/stages.log
  "$@" > $P/$name.log 2>&1
  local rc=$?  # before the line below: its $(date) would reset $?
  echo "[$(date +%H:%M:%S)] $name ended ($rc)" >> $P/stages.log
  return $rc
}
