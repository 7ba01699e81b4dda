//! `provider images list|prune`: the image cache in the data dir (see
//! `provider::images::cache`).

use anyhow::Context as _;
use clap::Subcommand;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::images::cache::human_bytes;
use crate::images::ImageStore;
use crate::units::ByteSize;

#[derive(Debug, Subcommand)]
pub enum ImagesCmd {
    /// The stored images, least recently used first.
    List,
    /// Evict the least recently used images no job uses, down to a size.
    Prune {
        /// Keep at most this much (suffix K, M, G) [default: 0, every image not in use].
        #[arg(long, value_name = "SIZE", default_value = "0")]
        max_size: ByteSize,
    },
}

pub fn run(ctx: &Ctx, cmd: ImagesCmd) -> anyhow::Result<Outcome> {
    let store = ImageStore::new(&ctx.data);
    let pruning = matches!(cmd, ImagesCmd::Prune { .. });
    let images = match cmd {
        ImagesCmd::List => store.list().context("list the image cache")?,
        ImagesCmd::Prune { max_size } => {
            // One writer at a time on the data dir, as for every other change to it.
            let _lock = ctx.data.lock()?;
            store
                .prune(max_size.bytes())
                .context("prune the image cache")?
        }
    };
    if ctx.json {
        output::json(&images)?;
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&["HASH", "SIZE", "LAST USED", "IN USE", "CONVERTED"]);
    for i in &images {
        let (alg, hex) = i.hash.split_once(':').unwrap_or(("", &i.hash));
        t.row(vec![
            format!("{alg}:{}", &hex[..hex.len().min(16)]),
            human_bytes(i.bytes),
            chrono::DateTime::from_timestamp(i.last_used as i64, 0)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            if i.in_use { "yes" } else { "no" }.into(),
            if i.converted { "squashfs" } else { "-" }.into(),
        ]);
    }
    print!("{}", t.render());
    let total: u64 = images.iter().map(|i| i.bytes).sum();
    let verb = if pruning { "evicted " } else { "" };
    println!("{verb}{} image(s), {}", images.len(), human_bytes(total));
    Ok(Outcome::Done)
}
