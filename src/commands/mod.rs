pub mod bench;
pub mod gc;
pub mod lock;
pub mod plan;
pub mod run;
pub mod show;
pub mod status;
