//! Cache recovery in the local executor, with stand-in stages that only
//! copy a "checkpoint" from step to step (no model is loaded).

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use spur_exec::{Executor, Job, LocalExecutor, Options, Outcome};
use spur_plan::{Hash, Plan, Role, StageKind};
use spur_stages::{NodeContext, Registry, Stage, StageError};
use spur_store::Store;

const WEIGHTS: &str = "policy/model.safetensors";

/// Steps each update computed, in order.
type Log = Arc<Mutex<Vec<u32>>>;

/// Any stage kind: reads its `Policy` input's checkpoint as the real model
/// stages do, and as an update writes the next one.
struct StandIn {
    kind: StageKind,
    log: Log,
}

impl Stage for StandIn {
    fn kind(&self) -> StageKind {
        self.kind
    }

    fn version(&self) -> u32 {
        1
    }

    fn prunable(&self) -> &'static [&'static str] {
        match self.kind {
            StageKind::Update => &[WEIGHTS],
            _ => &[],
        }
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<serde_json::Value, StageError> {
        let weights = match ctx.input(Role::Policy) {
            Some(i) => fs::read_to_string(i.out.join(WEIGHTS))
                .map_err(|_| StageError::Failed(format!("{} holds no weights", i.out.display())))?,
            None => "base\n".to_string(),
        };
        if self.kind == StageKind::Update {
            self.log.lock().unwrap().push(ctx.node.step);
            fs::create_dir_all(ctx.out.join("policy"))?;
            let next = format!("{weights}step {}\n", ctx.node.step);
            fs::write(ctx.out.join(WEIGHTS), next)?;
        } else {
            fs::write(ctx.out.join("done.txt"), "done")?;
        }
        Ok(serde_json::json!({}))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    plan: Plan,
    store: Store,
    registry: Registry,
    log: Log,
}

fn setup(steps: u32, checkpoint_every: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| {
        let path = dir.path().join(name);
        fs::write(&path, name).unwrap();
        path.display().to_string()
    };
    let text = format!(
        "models:\n  m: {{sources: [{{path: {}}}]}}\n\
         datasets:\n  train: {{sources: [{{path: {}}}]}}\n  test: {{sources: [{{path: {}}}]}}\n\
         rewards:\n  gt: {{kind: ground_truth}}\n\
         defaults:\n  model: m\n  train_data: train\n  reward: gt\n  steps: {steps}\n\
         \x20 materialize: {{checkpoint_every: {checkpoint_every}}}\n\
         \x20 evals:\n    math500: {{dataset: test}}\n",
        p("m.gguf"),
        p("train.jsonl"),
        p("test.jsonl"),
    );
    let experiment = spur_spec::parse(&text, &dir.path().join("exp.yaml")).unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    let log = Log::default();
    let mut registry = Registry::empty();
    for kind in StageKind::ALL {
        registry.add(Box::new(StandIn {
            kind,
            log: log.clone(),
        }));
    }
    let plan = spur_plan::plan(&experiment, &|k| registry.version(k), &|path: &Path| {
        store.content_hash(path)
    })
    .unwrap();
    Setup {
        _dir: dir,
        plan,
        store,
        registry,
        log,
    }
}

impl Setup {
    /// The cache as a new process sees it (nothing verified yet).
    fn fresh(&self) -> Store {
        Store::open(self.store.root()).unwrap()
    }

    /// Execute the plan as `spur run [--verify]` would, in a new process.
    fn run(&self, verify: bool) -> Outcome {
        let store = self.fresh();
        let job = Job {
            plan: &self.plan,
            store: &store,
            registry: &self.registry,
            runs: vec![0],
        };
        let options = Options {
            jobs: 1,
            keep_going: false,
            verify,
            devices: Vec::new(),
            progress: false,
        };
        let outcome = LocalExecutor.execute(&job, &options).unwrap();
        let failures: Vec<&str> = outcome
            .failures
            .iter()
            .map(|f| f.message.as_str())
            .collect();
        assert!(failures.is_empty(), "{failures:?}");
        outcome
    }

    /// Update node ids by step (index 0 is step 1).
    fn updates(&self) -> Vec<Hash> {
        let mut updates: Vec<_> = self
            .plan
            .nodes
            .iter()
            .filter(|n| n.kind == StageKind::Update)
            .collect();
        updates.sort_by_key(|n| n.step);
        updates.iter().map(|n| n.id).collect()
    }

    fn pruned(&self, id: &Hash) -> bool {
        !self.store.read_manifest(id).unwrap().pruned.is_empty()
    }

    /// Flip a byte of an update's checkpoint.
    fn corrupt(&self, id: &Hash) -> Vec<u8> {
        let path = self.store.out_dir(id).join(WEIGHTS);
        let good = fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[0] ^= 1;
        fs::write(&path, bad).unwrap();
        good
    }
}

#[test]
fn corrupt_last_checkpoint_recomputes_the_chain_from_the_base_model() {
    let s = setup(3, 0);
    s.run(false);
    let u = s.updates();
    assert_eq!(u.len(), 3);
    assert!(s.pruned(&u[0]) && s.pruned(&u[1]) && !s.pruned(&u[2]));
    let good = s.corrupt(&u[2]);
    s.log.lock().unwrap().clear();

    let outcome = s.run(true);
    let corrupted: Vec<Hash> = outcome.corrupted.iter().map(|c| c.0).collect();
    assert_eq!(corrupted, [u[2]]);
    assert_eq!(*s.log.lock().unwrap(), [1, 2, 3], "from the base model");
    for id in &u {
        assert!(outcome.computed.contains(id));
    }
    assert_eq!(
        fs::read(s.store.out_dir(&u[2]).join(WEIGHTS)).unwrap(),
        good
    );
    // The policy prunes the superseded checkpoints again.
    assert!(s.pruned(&u[0]) && s.pruned(&u[1]) && !s.pruned(&u[2]));

    // And the next run has nothing to do.
    s.log.lock().unwrap().clear();
    assert!(s.run(false).computed.is_empty());
    assert!(s.log.lock().unwrap().is_empty());
}

#[test]
fn corrupt_last_checkpoint_recomputes_from_the_last_kept_one() {
    let s = setup(4, 2);
    s.run(false);
    let u = s.updates();
    assert!(s.pruned(&u[0]) && !s.pruned(&u[1]) && s.pruned(&u[2]));
    s.corrupt(&u[3]);
    s.log.lock().unwrap().clear();
    // Without --verify: the step-4 eval is gone, and reads the checkpoint.
    let eval = s
        .plan
        .nodes
        .iter()
        .find(|n| n.kind == StageKind::Eval && n.step == 4)
        .unwrap();
    fs::remove_dir_all(s.store.node_dir(&eval.id)).unwrap();

    let outcome = s.run(false);
    let corrupted: Vec<Hash> = outcome.corrupted.iter().map(|c| c.0).collect();
    assert_eq!(corrupted, [u[3]]);
    assert_eq!(*s.log.lock().unwrap(), [3, 4], "from step 2's checkpoint");
    let store = s.fresh();
    assert!(store.verify(&u[3]).is_ok() && store.verify(&eval.id).is_ok());
}

#[test]
fn node_directory_without_manifest_is_quarantined_and_recomputed() {
    let s = setup(2, 0);
    s.run(false);
    let u = s.updates();
    // Step 1's update, read by step 2's rollout and update.
    fs::remove_file(s.store.node_dir(&u[0]).join("manifest.json")).unwrap();
    let quarantine = s.store.root().join("quarantine");
    s.log.lock().unwrap().clear();

    let outcome = s.run(false);
    assert_eq!(*s.log.lock().unwrap(), [1]);
    assert!(outcome.computed.contains(&u[0]));
    assert!(s.store.is_cached(&u[0]));
    assert_eq!(fs::read_dir(&quarantine).unwrap().count(), 1);
    // Nothing left to do, and no error on a rerun.
    assert!(s.run(false).computed.is_empty());
}
