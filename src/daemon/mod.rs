//! One baton process: a generation's lifecycle ([`generation`]) and everything around it
//! that is not HTTP proxying: how it was launched ([`launch`]), the control socket's server
//! ([`control_server`]), the admin listener ([`admin`]) with its metrics ([`exporter`]) and
//! its status page ([`status_page`], [`traffic`]), the state shared between generations
//! ([`state_dir`]), files written for other processes
//! ([`files`]), systemd's notify protocol ([`notify`]) and logging ([`logging`]).

pub mod admin;
pub mod admin_guard;
pub mod control_server;
pub mod exporter;
pub mod files;
pub mod generation;
pub mod launch;
pub mod logging;
pub mod notify;
pub mod state_dir;
pub mod status_page;
pub mod traffic;
pub mod unit;
