-- facerec's PostgreSQL schema (DATABASE_MIGRATE=auto runs it at start; an operator can run it
-- with psql instead and set DATABASE_MIGRATE=off). Idempotent: everything is created only where
-- absent, and existing tables, functions and indexes are left as they are.

create extension if not exists vector;

-- The original contract's users (the seed layout: username, embeddings), plus facerec's fields.
create table if not exists users (
  username text primary key,
  embeddings real[],
  samples bigint not null default 0,
  model_id text,
  updated_at timestamptz not null default now());
alter table users add column if not exists samples bigint not null default 0;
alter table users add column if not exists model_id text;
alter table users add column if not exists updated_at timestamptz not null default now();

-- The second API's face records: the other service's table, unchanged, plus the recognizer's id.
create table if not exists faces (
  id uuid primary key default gen_random_uuid(), display_name text, image_url text,
  face_vec vector(512), inserted_at timestamptz default now());
alter table faces add column if not exists model_id text;

-- Images of the records facerec registers (the other service keeps its own in object storage).
create table if not exists face_images (
  id uuid primary key references faces(id) on delete cascade,
  content_type text not null,
  bytes bytea not null);

-- The other service's search function, where absent.
do $facerec$
begin
  if not exists (select 1 from pg_proc where proname = 'match_faces') then
    execute $f$
      create function match_faces(query_vec vector(512), k int default 5, threshold real default 0.35)
      returns table (id uuid, display_name text, score real, image_url text) language sql stable as $$
        select f.id, f.display_name, 1 - (f.face_vec <=> query_vec) as score, f.image_url from faces f
        where f.face_vec is not null and (f.face_vec <=> query_vec) < threshold
        order by f.face_vec <=> query_vec limit k; $$;
    $f$;
  end if;
  -- An HNSW index for cosine distance on face_vec, unless one exists under another name.
  if not exists (select 1 from pg_indexes where tablename = 'faces'
                 and indexdef ilike '%using hnsw%face_vec%vector_cosine_ops%') then
    -- m and ef_construction from facerec's HNSW_M / HNSW_EF_CONSTRUCTION (session settings it
    -- sets before running this file), else pgvector's defaults.
    execute format('create index faces_face_vec_hnsw on faces using hnsw (face_vec vector_cosine_ops) '
                   'with (m = %s, ef_construction = %s)',
                   coalesce(nullif(current_setting('facerec.hnsw_m', true), ''), '16')::int,
                   coalesce(nullif(current_setting('facerec.hnsw_ef_construction', true), ''), '64')::int);
  end if;
end
$facerec$;

-- Replicas follow each other's writes through LISTEN/NOTIFY: a changed user's name on
-- facerec_users, a changed record's id on facerec_faces ('*': compare everything).
create or replace function facerec_notify_users() returns trigger language plpgsql as $$
begin
  if tg_op = 'TRUNCATE' then
    perform pg_notify('facerec_users', '*');
    return null;
  end if;
  if tg_op in ('UPDATE', 'DELETE') then
    perform pg_notify('facerec_users', case when octet_length(old.username) < 7000 then old.username else '*' end);
  end if;
  if tg_op in ('INSERT', 'UPDATE') and (tg_op = 'INSERT' or new.username is distinct from old.username) then
    perform pg_notify('facerec_users', case when octet_length(new.username) < 7000 then new.username else '*' end);
  end if;
  return null;
end $$;
create or replace function facerec_notify_faces() returns trigger language plpgsql as $$
begin
  if tg_op = 'TRUNCATE' then
    perform pg_notify('facerec_faces', '*');
    return null;
  end if;
  if tg_op in ('UPDATE', 'DELETE') then
    perform pg_notify('facerec_faces', old.id::text);
  end if;
  if tg_op = 'INSERT' or (tg_op = 'UPDATE' and new.id is distinct from old.id) then
    perform pg_notify('facerec_faces', new.id::text);
  end if;
  return null;
end $$;
create or replace trigger facerec_users_notify after insert or update or delete on users
  for each row execute function facerec_notify_users();
create or replace trigger facerec_users_truncate after truncate on users
  for each statement execute function facerec_notify_users();
create or replace trigger facerec_faces_notify after insert or update or delete on faces
  for each row execute function facerec_notify_faces();
create or replace trigger facerec_faces_truncate after truncate on faces
  for each statement execute function facerec_notify_faces();
