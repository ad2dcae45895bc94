//! An HTTP/1.1 "hello" server that upgrades itself on SIGUSR2 without refusing a connection.
use baton_handoff::{Drain, Inherited, PassedListener, SuccessorSpec, accept_until, open_listener, spawn_successor};
use std::{error::Error, io::Write, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::sleep;

fn main() -> Result<(), Box<dyn Error>> {
    let (mut inherited, exe) = (unsafe { Inherited::from_env() }?, std::env::current_exe()?); // SAFETY: no threads yet.
    baton_handoff::process::close_on_exec_all()?;
    let addr: baton_handoff::ListenAddr = std::env::args().nth(1).ok_or("usage: hello <ip:port>")?.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let (listener, drain) = (open_listener(&mut inherited, "http", &addr).await?, Drain::new());
        let (socket, conns, generation) = (listener.socket.clone(), drain.clone(), inherited.generation);
        tokio::spawn(accept_until(socket, "http", drain.draining(), move |stream, _peer| {
            conns.connections().spawn(serve(stream, conns.clone(), generation));
        }));
        let (mut usr2, pid) = (signal(SignalKind::user_defined2())?, std::process::id());
        inherited.ready.take().map(|r| r.signal_ready()).transpose()?;
        println!("serving pid={pid} generation={generation} on {}", listener.bound);
        std::io::stdout().flush()?;
        let ready = loop {
            usr2.recv().await.ok_or("no more signals")?;
            let (name, fd, origin) = ("http", listener.socket.as_fd(), listener.origin);
            let spec = SuccessorSpec {
                program: inherited.program.as_deref().unwrap_or(&exe),
                args: &std::env::args_os().skip(1).collect::<Vec<_>>(),
                listeners: vec![PassedListener { name, fd, origin }],
                extra: vec![],
                generation: generation + 1,
                binary: None,
            };
            match async { spawn_successor(&spec)?.await_ready(Duration::from_secs(10)).await }.await {
                Ok(ready) => break ready,
                Err(e) => eprintln!("{pid}: upgrade failed, still serving: {e:?}"),
            }
        };
        let report = drain.drain_until(Duration::from_secs(5)).await;
        eprintln!("{pid}: handed over to {ready:?}; drained {report:?}");
        Ok(())
    })
}

async fn serve(mut stream: baton_handoff::Stream, drain: Drain, generation: u64) -> std::io::Result<()> {
    let body = format!("hello from pid={} generation={generation}\n", std::process::id());
    let (mut buf, mut closing) = (Vec::new(), false);
    while !closing {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            tokio::select! {
                n = stream.read_buf(&mut buf) => if n? == 0 { return Ok(()) } else { continue },
                _ = async { drain.draining().cancelled().await; sleep(Duration::from_secs(1)).await } => return Ok(()),
            }
        };
        buf.drain(..end + 4);
        closing = drain.is_draining(); // Closing between requests would race a request on its way.
        let connection = if closing { "Connection: close\r\n" } else { "" };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{connection}\r\n", body.len());
        stream.write_all(format!("{head}{body}").as_bytes()).await?;
    }
    Ok(())
}
