"""Fleet serving: Triton replicas on one model repository (a folder or S3), one switch for all of them.

Triton has no cluster coordination: a load request reaches one replica, and loading
a new forget-step version replica after replica gives a window of mixed answers as
long as the spread of load times (3.4 s measured for 2 replicas). So a fleet switch
has two phases around one route decision, kept in the gateway:

  layout    the repository of `fv triton build` plus two ensembles, `unlearned_blue`
            and `unlearned_green`, each pinned to one forget_step version (its step's
            model_version); forget_step's config pins both colours' versions;
            `fleet.json` names the live colour. Clients call `unlearned` at the
            gateway, which routes it to `unlearned_<live colour>` on any replica.
  prepare   publish version N (in S3: every object first, then the configs that name
            it, so Triton never loads a half-written version); on EVERY replica load
            forget_step pinning {live version, N} and the idle colour's ensemble
            pinned to N; check each replica answers the probe images with N's logits
            and id through that ensemble. Any failure: unload what was prepared
            everywhere, restore the configs, nothing flips.
  flip      write fleet.json (live = the idle colour) and set the route in every
            gateway: one Lua shared-dict write per gateway (no reload), so with one
            gateway in front of the fleet the flip is one instant: a request routed
            before it is answered wholly by the old vector, after it by the new.
  settle    forget_step on every replica pins only the new live version again.

A replica that starts later loads what the repository says: both colours' pinned
versions and the live colour, so it comes up on the confirmed vector. With one
gateway per pod (Kubernetes sidecars) the flip is one write per pod, made in
parallel: the consistency window is the spread of those writes, stated in the README.
"""
